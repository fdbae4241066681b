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


def apply_engine_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Return ``kwargs`` with the CPU defaults filled in when there is no GPU."""
    out = dict(kwargs)
    if not has_cuda() and out.get("device") in (None, "cpu"):
        prepare_cpu_environment()
        for k, v in CPU_DEFAULTS.items():
            out.setdefault(k, v)
    return out


def _has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def apply_cli_defaults(argv: Sequence[str]) -> list[str]:
    """Return ``argv`` (``sglang serve`` flags) with the CPU defaults appended when there is no GPU."""
    out = list(argv)
    device_given = _has_flag(out, "--device")
    if has_cuda() or (device_given and "cpu" not in out):
        return out
    prepare_cpu_environment()
    for k, v in CPU_DEFAULTS.items():
        flag = "--" + k.replace("_", "-")
        if _has_flag(out, flag):
            continue
        out += [flag] if v is True else [flag, str(v)]
    return out
