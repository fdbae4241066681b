"""Out-of-tree CPU platform so that stock SGLang 0.5.23 runs on a plain x86 CPU.

Why: on a machine without CUDA, SGLang's in-tree CPU platform is only selected by
``SGLANG_USE_CPU_ENGINE=1``, which needs a CPU (AMX) build of ``sgl-kernel`` that
PyPI does not ship. Without it the platform is the generic base one, and
``layers/rotary_embedding/base.py`` then imports ``vllm._custom_ops.rotary_embedding``
(never called on the CPU path, which dispatches to ``forward_native``), so start-up
fails on a missing ``vllm``. That import is skipped when
``current_platform.is_out_of_tree()`` is true.

What: ``cpu_platform.HolesCpuPlatform`` is SGLang's own ``CpuSRTPlatform`` (gloo, psutil memory
accounting, CPU device) marked out-of-tree (``PlatformEnum.OOT``). Nothing else
changes: the torch_native attention backend, native RMSNorm/SiLU/RoPE and the
torch paths of the allocator run exactly as on any CPU.

When: ``activate()`` is consulted by every SGLang process on the machine, so it
returns ``None`` (does nothing) unless selected explicitly with
``SGLANG_PLATFORM=holes_cpu``. ``sglang_holes.Engine`` and ``sglang-holes serve``
set that variable themselves when no GPU is present; child processes inherit it.
``tests/test_platform_contract.py`` fails loudly if a future SGLang changes any of this.
"""

from __future__ import annotations

from sglang_holes.config import selected_platform

PLATFORM_NAME = "holes_cpu"
# The class lives in its own module: SGLang imports this entry-point module while it
# is itself resolving the platform, and importing sglang's platform modules from
# here at that moment is circular.
PLATFORM_CLASS = "sglang_holes.patches.launch.cpu_platform.HolesCpuPlatform"


def activate() -> str | None:
    """Entry point of group ``sglang.srt.platforms``: the platform class path, or ``None``."""
    if selected_platform() != PLATFORM_NAME:
        return None
    import torch

    if torch.cuda.is_available():
        raise RuntimeError(
            f"SGLANG_PLATFORM={PLATFORM_NAME} selects the plain-CPU platform, but a CUDA GPU is present; "
            "unset SGLANG_PLATFORM to use the GPU"
        )
    return PLATFORM_CLASS
