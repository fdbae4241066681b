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

import logging

from sglang_holes.patches.version import UnsupportedSGLangError, check_sglang_version

logger = logging.getLogger("sglang_holes")


def load() -> None:
    try:
        check_sglang_version()
    except UnsupportedSGLangError as e:
        logger.error("sglang-holes plugin disabled: %s", e)
        return
    from sglang.srt.mem_cache.registry import register_radix_cache_backend

    from sglang_holes.patches import internal_state

    internal_state.register()

    def holes_factory(ctx):  # imported on use: only a process that builds the cache pays for it
        from sglang_holes.patches.cache_factory import factory

        return factory(ctx)

    register_radix_cache_backend("holes", holes_factory)

    # Active only for servers that select --radix-cache-backend holes.
    from sglang_holes.patches import (
        attention_torch_native,
        chunk_validation,
        extend_batch,
        http_routes,
        meta_info,
        rpc,
    )

    extend_batch.register()
    attention_torch_native.register()
    rpc.register()
    _register_flashinfer()
    meta_info.register()
    http_routes.register()
    chunk_validation.register()


def _register_flashinfer() -> None:
    from sglang.srt.layers.attention import attention_registry

    stock = attention_registry.ATTENTION_BACKENDS.get("flashinfer")
    if stock is None:
        return

    def create(runner):
        if getattr(runner.server_args, "radix_cache_backend", None) == "holes":
            from sglang_holes.patches.attention_flashinfer import HoleFlashInferAttnBackend

            return HoleFlashInferAttnBackend(runner)
        return stock(runner)

    attention_registry.ATTENTION_BACKENDS["flashinfer"] = create
