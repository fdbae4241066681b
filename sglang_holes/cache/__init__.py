"""Cache layer: the hole-aware radix tree, its eviction policies and the recompute cost they weigh.

* ``node`` -- ``Node`` (one edge; ``slots is None`` = a hole), handles and result types.
* ``tree`` -- ``HoleTree``: match through holes, identity-aware insert, locks, eviction.
* ``eviction`` -- ``EvictionPolicy`` objects by name (``cost-aware``, ``priority-cost`` and, from
  ``leaf_policies``, SGLang's ``lru``/``lfu``/``slru``/``priority`` and ``lru-leaf``), injected into the tree.
* ``victim_index`` -- the incremental victim search (a heap the tree keeps up to date) and its full-scan reference.
* ``tree_audit`` -- ``HoleTree.check_integrity``'s invariants.
* ``recompute_cost`` -- FLOPs to rebuild the KV of a span (what ``cost-aware`` weighs).
* ``extend_plan`` -- per request: which positions reuse cached KV, which are recomputed.
"""

from __future__ import annotations

from sglang_holes.cache.eviction import EVICTION_POLICIES, CostAware, EvictionPolicy, make_policy
from sglang_holes.cache.leaf_policies import LeafPolicy, lru_leaf
from sglang_holes.cache.node import InsertResult, MatchResult, Node, Segment, TreeHandle
from sglang_holes.cache.recompute_cost import RecomputeCost
from sglang_holes.cache.tree import HoleTree

__all__ = [
    "EVICTION_POLICIES",
    "CostAware",
    "EvictionPolicy",
    "HoleTree",
    "InsertResult",
    "LeafPolicy",
    "MatchResult",
    "Node",
    "RecomputeCost",
    "Segment",
    "TreeHandle",
    "lru_leaf",
    "make_policy",
]
