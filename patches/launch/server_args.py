"""Server-argument defaults: ONE table, applied to ``sglang_holes.Engine`` keyword arguments
and to ``sglang-holes serve`` flags alike. Every default yields to an explicit user setting.

On a machine without CUDA, SGLang 0.5.23 runs with ``device="cpu"``,
``attention_backend="torch_native"`` and ``dtype="float32"`` on the out-of-tree CPU
platform (``patches/launch/platform.py``). With a GPU, SGLang's own defaults stand, except that
a ``holes`` server does not capture prefill CUDA graphs (hole batches are planned per
batch and cannot replay a captured plan; decode graphs are unaffected) and gets an
attention backend that runs hole batches on that GPU (``hole_attention_backend``).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sglang_holes.config import select_platform, selected_platform
from sglang_holes.patches.launch.hooks import BACKEND_NAME
from sglang_holes.patches.launch.platform import PLATFORM_NAME

logger = logging.getLogger("sglang_holes")

ALWAYS, HOLES, CPU, GPU_HOLES = "always", "holes", "cpu", "gpu+holes"
# --radix-eviction-policy values the holes cache runs: its own, and SGLang's with SGLang's leaf-only semantics.
HOLE_POLICIES = ("cost-aware", "priority-cost", "lru", "lfu", "slru", "priority", "lru-leaf")


@dataclass(frozen=True)
class Default:
    """``field`` (a ``ServerArgs`` name) defaults to ``value`` where ``applies``, unless the user
    set it or any field of ``unless``."""

    field: str
    value: Any
    applies: str
    unless: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


DEFAULTS: tuple[Default, ...] = (
    # Engine: pass radix_cache_backend=None for SGLang's own cache; serve: --radix-cache-backend radix.
    Default("radix_cache_backend", BACKEND_NAME, ALWAYS),
    # Cheapest recompute first, interior holes allowed: a hole request costs what it recomputes
    # (benchmarks/results/policies.md). `--radix-eviction-policy lru` keeps stock behaviour.
    Default("radix_eviction_policy", "cost-aware", HOLES),
    Default("disable_prefill_cuda_graph", True, GPU_HOLES, unless=("cuda_graph_backend_prefill",)),
    # A backend that runs hole batches, for this GPU (``hole_attention_backend``): SGLang's own FA3 on
    # Hopper; FlashInfer elsewhere (SGLang picks trtllm_mha on Blackwell, which cannot run them).
    Default("attention_backend", "auto-holes", GPU_HOLES,
            unless=("prefill_attention_backend", "decode_attention_backend")),
    Default("device", "cpu", CPU),
    Default("attention_backend", "torch_native", CPU),
    Default("sampling_backend", "pytorch", CPU),
    Default("dtype", "float32", CPU),
    Default("disable_cuda_graph", True, CPU),
    # An idle scheduler otherwise busy-polls its sockets at 100% of a core; on a CPU box that
    # core is the one the next request (or another engine) needs. Wakes at once on a message.
    Default("sleep_on_idle", True, CPU),
    # SGLang sizes the KV pool from free host RAM on CPU; a fixed pool keeps a laptop or CI
    # runner from reserving most of its memory.
    Default("max_total_tokens", 65536, CPU),
    # SGLang derives this from the chunk size and device memory; on a CPU a large
    # --chunked-prefill-size (16384) makes it negative and the server refuses to start. Its
    # runtime slack is (1 - this) x the free RAM before loading, and free host RAM also moves
    # with every other process: 0.5 refused to start when another engine grew meanwhile
    # (the pool itself stays capped by --max-total-tokens).
    Default("mem_fraction_static", 0.8, CPU),
)

# Fields whose given value decides which defaults apply (besides the defaults' own fields).
_DECIDING = ("device", "radix_cache_backend", "cuda_graph_backend_prefill", "model_path",
             "prefill_attention_backend", "decode_attention_backend")
# (Engine keyword or ServerArgs field; serve flags are parsed by _given_flags)


def _is_set(value: Any) -> bool:
    return value not in (None, False, "", "disabled", "none")


@dataclass(frozen=True)
class Refused:
    """A setting a ``holes`` server refuses at start: ``field`` whenever ``refused(value)``, because ``why``."""

    field: str
    refused: Callable[[Any], bool]
    why: str


REFUSED: tuple[Refused, ...] = (
    Refused("enable_mixed_chunk", _is_set, "decode rows mixed into a hole extend batch would run at the wrong "
            "positions; serve without --enable-mixed-chunk"),
    Refused("speculative_algorithm", _is_set, "draft and verify batches do not carry the original positions of "
            "hole queries; serve without speculative decoding"),
    Refused("cuda_graph_backend_prefill", _is_set, "hole batches are planned per batch and must never replay a "
            "captured prefill plan (the default with holes is --disable-prefill-cuda-graph)"),
    Refused("enable_mis", _is_set, "multi-item scoring runs FlashInfer wrappers a hole batch does not plan"),
    Refused("disaggregation_mode", lambda v: _is_set(v) and v != "null", "PD disaggregation sends a prefill's row "
            "by virtual range after each piece, and with holes those slices can hold padding slots"),
    Refused("pp_size", lambda v: _is_set(v) and int(v) > 1, "pipeline parallelism splits a batch's layers across "
            "ranks that do not receive the hole positions; serve with --pp-size 1"),
    Refused("enable_dp_attention", _is_set, "DP attention re-batches extends across ranks without the hole "
            "positions; use --dp-size without --enable-dp-attention"),
    Refused("enable_two_batch_overlap", _is_set, "two-batch overlap splits an extend batch in two by token count, "
            "which cuts hole requests' positions and plans"),
    Refused("enable_single_batch_overlap", _is_set, "single-batch overlap reschedules an extend's layers without "
            "the hole positions"),
)


def refusal(settings: Mapping[str, Any] | Any) -> str | None:
    """Why a server with these settings (``Engine`` keyword arguments, or a ``ServerArgs``) cannot run
    the ``holes`` cache, or None."""
    def get(field: str, default: Any = None) -> Any:
        if isinstance(settings, Mapping):
            return settings.get(field, default)
        return getattr(settings, field, default)

    policy = get("radix_eviction_policy")
    if get("radix_cache_backend", BACKEND_NAME) != BACKEND_NAME:
        if policy in ("cost-aware", "priority-cost", "lru-leaf"):
            return f"--radix-eviction-policy {policy} needs --radix-cache-backend {BACKEND_NAME}"
        return None
    if policy == "tlru":
        return ("the holes radix cache does not run --radix-eviction-policy tlru: SGLang keeps T-LRU's per-branch "
                "history only in its unified radix cache, which the holes cache replaces; use lru, lfu, slru, "
                "priority or cost-aware")
    if policy is not None and policy not in HOLE_POLICIES:
        return (f"the holes radix cache runs --radix-eviction-policy {' or '.join(HOLE_POLICIES)} "
                f"(SGLang's as SGLang evicts them: leaves only), not {policy!r}")
    for r in REFUSED:
        value = get(r.field)
        if r.refused(value):
            shown = "" if value is True else f" {value}"
            return f"the holes radix cache does not support --{r.field.replace('_', '-')}{shown}: {r.why}"
    if _prefill_graphs(get("cuda_graph_config")):
        return ("the holes radix cache does not support prefill CUDA graphs (--cuda-graph-config): hole batches "
                "are planned per batch and must never replay a captured prefill plan")
    return None


def _prefill_graphs(config: Any) -> bool:
    """Whether a ``--cuda-graph-config`` (JSON text, dict or SGLang's parsed config) captures prefill graphs."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            return False
    prefill = config.get("prefill") if isinstance(config, Mapping) else getattr(config, "prefill", None)
    backend = prefill.get("backend") if isinstance(prefill, Mapping) else getattr(prefill, "backend", None)
    return _is_set(backend)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_generation() -> tuple[int, tuple[int, int]]:
    """(compute capability major, CUDA version) of GPU 0."""
    import torch

    cuda = tuple(int(x) for x in (torch.version.cuda or "0.0").split(".")[:2])
    return torch.cuda.get_device_capability(0)[0], cuda


def hole_attention_backend() -> str:
    """The hole-capable attention backend for this GPU: ``fa3`` where SGLang picks it (Hopper with
    CUDA >= 12.3), ``flashinfer`` elsewhere (Ampere, Ada, and Blackwell, where SGLang's
    ``trtllm_mha`` runs no hole batches)."""
    major, cuda = gpu_generation()
    return "fa3" if major == 9 and cuda >= (12, 3) else "flashinfer"


def prepare_cpu_environment() -> None:
    """Select the out-of-tree CPU platform for this process and every process it spawns.

    Raises ``RuntimeError`` if ``lscpu`` (needed by SGLang's CPU thread binding) is missing.
    """
    if shutil.which("lscpu") is None:
        raise RuntimeError("SGLang on CPU needs the `lscpu` binary (Debian/Ubuntu: apt-get install util-linux)")
    chosen = selected_platform()
    if chosen is None or chosen == PLATFORM_NAME:  # never override a platform the user chose
        select_platform(PLATFORM_NAME)


def missing_defaults(given: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults to add to the user's settings ``given`` (field -> value; present = set).

    The CPU defaults apply without CUDA unless another device was asked for (and then
    select the CPU platform); the GPU one only with CUDA and the ``holes`` cache.
    """
    cuda = has_cuda()
    backend = given.get("radix_cache_backend", BACKEND_NAME)
    on = {ALWAYS: True,
          HOLES: backend == BACKEND_NAME,
          CPU: not cuda and given.get("device") in (None, "cpu"),
          GPU_HOLES: cuda and backend == BACKEND_NAME}
    out = {d.field: d.value for d in DEFAULTS
           if on[d.applies] and d.field not in given and not any(u in given for u in d.unless)}
    if on[GPU_HOLES] and "attention_backend" in out:
        if is_mla_model(given.get("model_path")):  # MLA runs SGLang's MLA backends (stock path)
            del out["attention_backend"]
        else:
            out["attention_backend"] = hole_attention_backend()
            logger.warning("sglang-holes: --attention-backend %s (runs hole batches on this GPU; pass "
                           "--attention-backend to choose another)", out["attention_backend"])
    if on[CPU]:
        prepare_cpu_environment()
    return out


def is_mla_model(model_path: Any) -> bool:
    """Whether a local model directory holds an MLA model (DeepSeek-style ``kv_lora_rank``)."""
    try:
        config = json.loads((Path(str(model_path)) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False
    text = config.get("text_config", config)
    return bool(text.get("kv_lora_rank")) if isinstance(text, dict) else False


def apply_engine_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``sglang_holes.Engine`` keyword arguments with the table's defaults filled in."""
    return {**kwargs, **missing_defaults(kwargs)}


def flag_value(argv: Sequence[str], flag: str) -> tuple[int, str] | None:
    """(index of the value, value) of ``flag`` in ``argv``, or None."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return i + 1, argv[i + 1]
        if a.startswith(flag + "="):
            return i, a.split("=", 1)[1]
    return None


def _given_flags(argv: Sequence[str]) -> dict[str, Any]:
    """The table's fields the user set in ``argv`` (a bare boolean flag reads as True)."""
    given: dict[str, Any] = {}
    for name in {d.field for d in DEFAULTS} | set(_DECIDING):
        flag = "--" + name.replace("_", "-")
        found = flag_value(argv, flag)
        if found is not None and not found[1].startswith("--"):
            given[name] = found[1]
        elif flag in argv:
            given[name] = True
    return given


def apply_cli_defaults(argv: Sequence[str]) -> list[str]:
    """``sglang serve`` flags with the table's defaults appended."""
    out = list(argv)
    for name, value in missing_defaults(_given_flags(out)).items():
        flag = "--" + name.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out
