"""sglang-holes: reuse KV cache with holes in it.

Engine-agnostic core (this package never imports sglang; ``sglang_holes.patches``
is the only code that does):

* ``HolePlan`` -- once-per-batch CPU plan for segmented prefill.
* ``HoleTree`` -- radix tree whose nodes can lose their KV while descendants keep
  theirs; matching through holes; ``lru-leaf`` and ``cost-aware`` eviction.
* ``segmented_attention`` -- attention for the compacted missing tokens of a batch
  (pure-torch reference, FlashInfer custom-mask / span-batched paths, auto choice).

``sglang_holes.Engine`` (a drop-in ``sglang.Engine``) is resolved lazily from
``sglang_holes.patches.engine`` so that importing the core never imports sglang.
"""

from __future__ import annotations

from typing import Any

from sglang_holes.attention import AttentionParams, FlashInferHoleAttention, segmented_attention
from sglang_holes.cost import CostModel, choose_path
from sglang_holes.plan import HolePlan, spans_from_inclusive
from sglang_holes.recompute_cost import RecomputeCost
from sglang_holes.tree import HoleTree, InsertResult, MatchResult, TreeHandle

__all__ = [
    "AttentionParams",
    "CostModel",
    "Engine",
    "FlashInferHoleAttention",
    "HolePlan",
    "HoleTree",
    "InsertResult",
    "MatchResult",
    "RecomputeCost",
    "TreeHandle",
    "choose_path",
    "segmented_attention",
    "spans_from_inclusive",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from sglang_holes.patches.engine import Engine

        return Engine
    raise AttributeError(f"module 'sglang_holes' has no attribute {name!r}")
