"""A stand-in ``sgl_kernel`` so SGLang's FA3 backend module imports on a machine without libcuda.

``sglang.srt.layers.attention.flashattention_backend`` imports ``sgl_kernel`` at module level,
whose CUDA ops fail to load without a GPU. The stand-in provides the names that module and
the backend's ``__init__`` import; each raises if called, except ``flash_attn_with_kvcache``,
which is the pure-torch interpreter. The extend path calls the kernel through the module-level
name ``flash_attn_with_kvcache``, which the tests replace with the interpreter as well.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sglang_holes.attention.flash_attn_interpreter import flash_attn_with_kvcache

FA3_MODULE = "sglang.srt.layers.attention.flashattention_backend"
OUR_MODULE = "sglang_holes.patches.attention.fa3"


def _no_kernel(name: str) -> Any:
    def call(*_: Any, **__: Any) -> Any:
        raise NotImplementedError(f"sgl_kernel.{name} is not available on CPU (test stand-in)")

    return call


@contextmanager
def fa3_backend_module() -> Iterator[types.ModuleType]:
    """Import SGLang's FA3 backend module (and ours) against the stand-in; restore ``sys.modules`` after."""
    saved = {k: sys.modules.get(k) for k in ("sgl_kernel", "sgl_kernel.flash_attn", FA3_MODULE, OUR_MODULE)}
    kernel = types.ModuleType("sgl_kernel")
    kernel.merge_state_v2 = _no_kernel("merge_state_v2")
    flash = types.ModuleType("sgl_kernel.flash_attn")
    flash.flash_attn_with_kvcache = flash_attn_with_kvcache
    flash.flash_attn_varlen_func = _no_kernel("flash_attn_varlen_func")
    flash.get_scheduler_metadata = _no_kernel("get_scheduler_metadata")
    kernel.flash_attn = flash
    sys.modules.update({"sgl_kernel": kernel, "sgl_kernel.flash_attn": flash})
    sys.modules.pop(FA3_MODULE, None)
    sys.modules.pop(OUR_MODULE, None)
    try:
        module = importlib.import_module(FA3_MODULE)
        module.flash_attn_with_kvcache = flash_attn_with_kvcache  # the kernel forward_extend calls
        yield module
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
