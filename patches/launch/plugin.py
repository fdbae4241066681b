"""General plugin entry point (group ``sglang.srt.plugins``).

SGLang calls ``load()`` early in every process it starts: the engine or HTTP
server process, the spawned scheduler, the detokenizer. Hooks registered here are
applied by ``HookRegistry.apply_hooks()`` right after. Installing sglang-holes
must change nothing until the user selects it, so every hook registered here is
either read-only or acts only on requests/caches that selected sglang-holes.

SGLang catches and logs exceptions raised by plugins, so a version mismatch here
only logs an error and registers nothing; ``sglang_holes.Engine`` and
``sglang-holes serve`` check the version themselves and refuse to start.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from sglang_holes.cache.eviction import EVICTION_POLICIES
from sglang_holes.config import HolesConfig
from sglang_holes.patches.launch.hooks import BACKEND_NAME, register_hooks
from sglang_holes.patches.launch.version import UnsupportedSGLangError, check_sglang_version

logger = logging.getLogger("sglang_holes")


def load() -> None:
    try:
        check_sglang_version()
    except UnsupportedSGLangError as e:
        logger.error("sglang-holes plugin disabled: %s", e)
        return
    from sglang.srt.mem_cache.registry import register_radix_cache_backend

    def holes_factory(ctx):  # imported on use: only a process that builds the cache pays for it
        from sglang_holes.patches.scheduler.cache_factory import factory

        return factory(ctx)

    register_radix_cache_backend(BACKEND_NAME, holes_factory)
    _add_eviction_policy_choices()
    _wrap_attention_backend("torch_native", "sglang_holes.patches.attention.torch_native:HoleTorchNativeAttnBackend")
    _wrap_attention_backend("flashinfer", "sglang_holes.patches.attention.flashinfer:HoleFlashInferAttnBackend")
    _wrap_attention_backend("fa3", "sglang_holes.patches.attention.fa3:HoleFlashAttentionBackend")
    # Every hook acts only on servers that select --radix-cache-backend holes (or is read-only).
    register_hooks()


def _add_eviction_policy_choices() -> None:
    """``--radix-eviction-policy cost-aware`` (``priority-cost``, ``lru-leaf``): SGLang's own flag selects ours."""
    from sglang.srt.arg_groups.choices import RADIX_EVICTION_POLICY_CHOICES, add_radix_eviction_policy_choices

    add_radix_eviction_policy_choices([p for p in EVICTION_POLICIES if p not in RADIX_EVICTION_POLICY_CHOICES])


def _wrap_attention_backend(name: str, hole_backend: str) -> None:
    """``ATTENTION_BACKENDS[name]`` builds our subclass for ``holes`` servers, the stock backend otherwise.

    The subclass's module is imported only when such a backend is built (importing SGLang's
    FlashInfer backend takes seconds).
    """
    from sglang.srt.layers.attention import attention_registry

    stock = attention_registry.ATTENTION_BACKENDS.get(name)
    if stock is None:
        return

    def create(runner: Any) -> Any:
        if getattr(runner.server_args, "radix_cache_backend", None) != BACKEND_NAME or \
                getattr(runner, "use_mla_backend", False):  # MLA: SGLang's MLA backends (no hole batches)
            return stock(runner)
        module, cls = hole_backend.split(":")
        backend = getattr(importlib.import_module(module), cls)
        return backend(runner, config=HolesConfig.build(runner.server_args))

    attention_registry.ATTENTION_BACKENDS[name] = create
