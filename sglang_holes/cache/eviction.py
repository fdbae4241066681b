"""Eviction policies for ``HoleTree``.

Leaves-only policies (``sglang_holes.cache.leaf_policies``): SGLang's own ``lru``, ``lfu``,
``slru`` and ``priority``, evicting what SGLang's cache evicts on the same operations, and
``lru-leaf`` (least recently used on this tree's own clock). Only leaves of the cached set go,
whole; the cache stays prefix-closed unless something else punched a hole.

``cost-aware`` — evict the KV whose expected recompute cost per freed slot is lowest,
wherever it sits: interior nodes too (their descendants keep KV and later requests
recompute only the hole), and only the head of a node when less is needed.

    key(node) = cost(first slot of node) · crf(node)          (lowest goes first)
    crf(node) = Σ over the node's hits at ticks tᵢ of exp(−(now − tᵢ) / decay)

* ``cost`` is the FLOPs to rebuild the node's first slot (``recompute_cost``): larger deep in a
  long context, where every token attends to more keys. A node is eaten from its start (its
  cheapest slots, whole pages), so the key is that of the next slot to go.
* ``crf`` (the "combined recency and frequency" of LRFU, Lee et al., IEEE ToC 2001) counts the
  matches that walked through the node, each decayed by its age in tree clock ticks (one per match
  or insert; ``decay`` = 8 ticks, ~3 requests, by default). Frequent use keeps a node, and so does
  recent use; a context nobody reads any more (a closed chat, an agent that started a new task)
  loses its claim at the same rate however often, and however expensively, it was used before.
  Every hit on a descendant passes through its ancestors, so a shared system prompt or document
  prefix accumulates the hits of everything below it and is the last to go.
* The decay is the same for every node, so ``exp(now / decay)`` factors out of every key: the
  order of two nodes changes only when one of them is hit or changes shape. ``key`` is kept as
  ``log(cost) + log Σ exp(tᵢ / decay)``, constant between the tree's updates, and the victim search
  is a heap (``victim_index.HeapIndex``), O(log n) per victim instead of a scan of the tree.

An earlier form, ``hit rate × recency × cost of the evicted head``, was not time-invariant (it needed
a scan per eviction) and computed 11-12% more FLOPs than ``lru`` on the agent stream of
``benchmarks/bench_policy_streams.py``: a finished transcript, expensive per slot, outlived the live
contexts of rarer agents. The decay trades the streams against each other: on that benchmark's
streams (default seeds and seeds 10-13) a decay of 16 ticks saves more on Zipf chat (14-38% fewer
FLOPs than ``lru`` at 25% cache) but computes up to 10% more on agent transcripts, whose early
nodes gather the hits of every step; 8 ticks saves 15-30% on chat there and stays within ~1% of
``lru`` on every agent stream tried. Results on seeds not used to choose it:
``benchmarks/results/policy_streams.md``.

Worked example (SmolLM2-135M constants: linear ≈ 0.21 GFLOP/token, attention ≈ 69 kFLOP/key):
a shared 1k-token system prompt S hit 10 times, and two 8k-token documents A, B below
it, each hit 5 times, all recently (so crf ≈ hits); 1k tokens must go. S's first slot costs
≈ 0.21 GFLOP, key ≈ 2.1; A's first slot (position 1,000) ≈ 0.21 + 69 k·1 k ≈ 0.28 GFLOP, key ≈ 1.4;
a slot in A's last 1k ≈ 0.21 + 69 k·8.5 k ≈ 0.80 GFLOP. So cost-aware punches a hole at the START
of A (or B), keeping S and the expensive tails, while a leaf policy drops a tail, which costs
~2.9× more per slot to recompute — and, the cache being prefix-closed, a returning request then
recomputes the whole tail rather than a cheap hole.

``priority-cost`` — SGLang's request priorities first, ``cost-aware`` within one priority.

``benchmarks/simulate_eviction.py`` compares ``cost-aware`` and ``lru-leaf`` on traces; its table is
in the README.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np

from sglang_holes.cache.leaf_policies import (
    TreeView,
    lru_leaf,
    sglang_lfu,
    sglang_lru,
    sglang_priority,
    sglang_slru,
)
from sglang_holes.cache.node import Node
from sglang_holes.cache.recompute_cost import SMOLLM2_135M, RecomputeCost
from sglang_holes.cache.victim_index import HeapIndex


class EvictionPolicy(Protocol):
    name: str
    partial: bool  # may evict the head of a node
    leaves_only: bool  # only leaves of the cached set are candidates

    def key(self, node: Node) -> Any:
        """Sort key, lowest evicted first. It may read only what changes where the tree updates the node's
        entry in the index (its statistics, shape, KV), so it stays valid between those updates."""
        ...

    def hit(self, node: Node, now: int) -> None:
        """A match walked through ``node`` (or an insert created it) at tick ``now``: update this policy's
        statistics of it."""
        ...

    def index(self, tree: TreeView) -> HeapIndex:
        """The incremental victim search over ``tree`` (``victim_index``)."""
        ...


class CostAware:
    """``cost-aware``; with ``by_priority`` (``priority-cost``), SGLang's request priorities first: KV
    only lower-priority requests inserted goes before any of a higher priority, cost-aware within one."""

    partial = True
    leaves_only = False

    def __init__(self, cost: RecomputeCost, decay: float = 8.0, by_priority: bool = False):
        if decay <= 0:
            raise ValueError("decay must be > 0")
        self.cost = cost
        self.decay = decay
        self.by_priority = by_priority
        self.name = "priority-cost" if by_priority else "cost-aware"

    def hit(self, node: Node, now: int) -> None:
        node.log_crf = float(np.logaddexp(node.log_crf, now / self.decay))

    def key(self, node: Node) -> tuple[int, float]:
        first = self.cost.span(node.start, node.start + 1)  # its cheapest slot, the first to go
        cost = math.log(first) if first > 0 else -math.inf
        return (node.priority if self.by_priority else 0, cost + node.log_crf)

    def crf(self, node: Node, now: int) -> float:
        """The node's decayed hit count at tick ``now`` (what ``key`` orders by, without the common factor)."""
        return math.exp(node.log_crf - now / self.decay)

    def index(self, tree: TreeView) -> HeapIndex:
        return HeapIndex(self, tree)


def _cost_aware(recompute_cost: RecomputeCost | None, decay: float = 8.0, by_priority: bool = False) -> CostAware:
    return CostAware(recompute_cost or SMOLLM2_135M, decay=float(decay), by_priority=by_priority)


# name -> factory(recompute cost of the served model or None for SmolLM2-135M's constants, **params)
EVICTION_POLICIES: Mapping[str, Callable[..., EvictionPolicy]] = MappingProxyType({
    "lru-leaf": lambda _cost: lru_leaf(),
    "cost-aware": _cost_aware,
    "priority-cost": lambda cost, **params: _cost_aware(cost, by_priority=True, **params),
    # SGLang's own, leaves only, as SGLang's RadixCache evicts (sglang_holes.cache.leaf_policies).
    "lru": lambda _cost: sglang_lru(),
    "lfu": lambda _cost: sglang_lfu(),
    "slru": lambda _cost, **params: sglang_slru(**params),
    "priority": lambda _cost: sglang_priority(),
})
# The parameters each policy takes (``--radix-eviction-policy-config``).
POLICY_PARAMS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "lru-leaf": (), "cost-aware": ("decay",), "priority-cost": ("decay",),
    "lru": (), "lfu": (), "slru": ("protected_threshold",), "priority": ()})


def make_policy(name: str, recompute_cost: RecomputeCost | None = None, **params: float) -> EvictionPolicy:
    """The registered policy ``name`` with its ``params`` (``ValueError`` for an unknown name or parameter)."""
    factory = EVICTION_POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown eviction policy {name!r}; expected one of {tuple(EVICTION_POLICIES)}")
    unknown = set(params) - set(POLICY_PARAMS[name])
    if unknown:
        raise ValueError(f"eviction policy {name!r} takes no parameter {sorted(unknown)}")
    return factory(recompute_cost, **params)
