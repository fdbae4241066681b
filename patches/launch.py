"""Server-argument defaults shared by ``sglang_holes.Engine`` and ``sglang-holes serve``.

On a machine without CUDA, SGLang 0.5.23 runs with ``device="cpu"``,
``attention_backend="torch_native"`` and ``dtype="float32"`` on the out-of-tree CPU
platform (``patches/platform.py``). With a GPU, SGLang's own defaults stand
(FlashInfer attention). Every default here yields to an explicit user setting.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

from sglang_holes.patches.platform import PLATFORM_NAME

# Defaults for a plain CPU; each applies only when the user did not set it.
CPU_DEFAULTS: dict[str, Any] = {
    "device": "cpu",
    "attention_backend": "torch_native",
    "sampling_backend": "pytorch",
    "dtype": "float32",
    "disable_cuda_graph": True,
    # An idle scheduler otherwise busy-polls its sockets at 100% of a core; on a CPU box that
    # core is the one the next request (or another engine) needs. Wakes at once on a message.
    "sleep_on_idle": True,
    # SGLang sizes the KV pool from free host RAM on CPU; a fixed pool keeps a
    # laptop or CI runner from reserving most of its memory.
    "max_total_tokens": 65536,
}


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def prepare_cpu_environment() -> None:
    """Select the out-of-tree CPU platform for this process and every process it spawns.

    Raises ``RuntimeError`` if ``lscpu`` (needed by SGLang's CPU thread binding) is missing.
    """
    if shutil.which("lscpu") is None:
        raise RuntimeError("SGLang on CPU needs the `lscpu` binary (Debian/Ubuntu: apt-get install util-linux)")
    selected = os.environ.get("SGLANG_PLATFORM")
    if selected and selected != PLATFORM_NAME:
        return  # the user chose another platform explicitly
    os.environ["SGLANG_PLATFORM"] = PLATFORM_NAME


# With a GPU and the holes cache: hole batches are planned per batch and cannot replay a
# captured prefill graph (decode graphs are unaffected).
GPU_HOLES_DEFAULTS: dict[str, Any] = {"disable_prefill_cuda_graph": True}


def apply_engine_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Return ``kwargs`` with the CPU defaults filled in when there is no GPU."""
    out = dict(kwargs)
    if has_cuda() and out.get("radix_cache_backend") == "holes":
        for k, v in GPU_HOLES_DEFAULTS.items():
            out.setdefault(k, v)
    if not has_cuda() and out.get("device") in (None, "cpu"):
        prepare_cpu_environment()
        for k, v in CPU_DEFAULTS.items():
            out.setdefault(k, v)
    return out


def _has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def flag_value(argv: Sequence[str], flag: str) -> tuple[int, str] | None:
    """(index of the value, value) of ``flag`` in ``argv``, or None."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return i + 1, argv[i + 1]
        if a.startswith(flag + "="):
            return i, a.split("=", 1)[1]
    return None


def apply_cli_defaults(argv: Sequence[str]) -> list[str]:
    """Return ``argv`` (``sglang serve`` flags) with the CPU defaults appended when there is no GPU."""
    out = list(argv)
    device_given = _has_flag(out, "--device")
    if has_cuda():
        backend = flag_value(out, "--radix-cache-backend")
        if backend is not None and backend[1] == "holes" and not _has_flag(out, "--disable-prefill-cuda-graph") \
                and not _has_flag(out, "--cuda-graph-backend-prefill"):
            out.append("--disable-prefill-cuda-graph")
        return out
    if device_given and "cpu" not in out:
        return out
    prepare_cpu_environment()
    for k, v in CPU_DEFAULTS.items():
        flag = "--" + k.replace("_", "-")
        if _has_flag(out, flag):
            continue
        out += [flag] if v is True else [flag, str(v)]
    return out
