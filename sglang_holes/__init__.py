"""sglang-holes: reuse KV cache with holes in it.

Engine-agnostic core (this package never imports sglang; ``sglang_holes.patches``
is the only code that does), one subpackage per layer:

* ``sglang_holes.attention`` -- ``HolePlan`` (once-per-batch CPU plan) and
  ``segmented_attention`` for the compacted missing tokens of a batch (pure-torch
  reference, CPU SDPA, FlashInfer custom-mask / span-batched paths, auto choice).
* ``sglang_holes.cache`` -- ``HoleTree``, a radix tree whose nodes can lose their KV
  while descendants keep theirs; matching through holes; eviction policies
  (``make_policy("lru-leaf" | "cost-aware")``); per-request extend plans.
* ``sglang_holes.chunks`` -- RAG chunk reuse: kv_hints, chunk store, RoPE re-rotation.
* ``sglang_holes.config`` -- ``HolesConfig``, every setting in one validated object.

``sglang_holes.Engine`` (a drop-in ``sglang.Engine``) is resolved lazily from
``sglang_holes.patches.launch.engine`` so that importing the core never imports sglang.
"""

from __future__ import annotations

from typing import Any

from sglang_holes.attention import (
    AttentionParams,
    BatchHoles,
    CostModel,
    FlashInferHoleAttention,
    HolePlan,
    KVCache,
    Scoring,
    choose_path,
    segmented_attention,
    spans_from_inclusive,
)
from sglang_holes.cache import (
    EvictionPolicy,
    HoleTree,
    InsertResult,
    MatchResult,
    RecomputeCost,
    Segment,
    TreeHandle,
    make_policy,
)
from sglang_holes.config import HolesConfig

__all__ = [
    "AttentionParams",
    "BatchHoles",
    "CostModel",
    "Engine",
    "EvictionPolicy",
    "FlashInferHoleAttention",
    "HolePlan",
    "HoleTree",
    "HolesConfig",
    "InsertResult",
    "KVCache",
    "MatchResult",
    "RecomputeCost",
    "Scoring",
    "Segment",
    "TreeHandle",
    "choose_path",
    "make_policy",
    "segmented_attention",
    "spans_from_inclusive",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from sglang_holes.patches.launch.engine import Engine

        return Engine
    raise AttributeError(f"module 'sglang_holes' has no attribute {name!r}")
