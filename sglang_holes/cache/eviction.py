"""Eviction policies for ``HoleTree``.

Leaves-only policies (``sglang_holes.cache.leaf_policies``): SGLang's own ``lru``, ``lfu``,
``slru`` and ``priority``, evicting what SGLang's cache evicts on the same operations, and
``lru-leaf`` (least recently used on this tree's own clock). Only leaves of the cached set go,
whole; the cache stays prefix-closed unless something else punched a hole.

``cost-aware`` — evict the KV whose expected recompute cost per freed slot is lowest,
wherever it sits: interior nodes too (their descendants keep KV and later requests
recompute only the hole), and only the head of a node when less is needed.

    priority(node) = reuse(node) · cost(head) / len(head)               (lowest goes first)
    reuse(node)    = hits(node) / (now − created(node) + τ)  ·  τ / (now − last_access(node) + τ)

* ``head`` is the part an eviction of ``num_tokens`` would drop: the node's first
  ``num_tokens`` tokens (rounded up to pages), or the whole node if shorter — earlier
  positions are cheaper to rebuild, so a node is eaten from its start.
* ``cost/len`` is the FLOPs to rebuild one of those slots (``recompute_cost``): larger
  deep in a long context, where every token attends to more keys.
* ``hits`` counts the matches that walked through the node. Every hit on a descendant
  passes through its ancestors, so a shared system prompt or document prefix
  accumulates the hits of everything below it and is the last to go.
* ``reuse`` estimates how likely the node is to be needed soon. Its first factor is the
  node's hit RATE over its lifetime (in tree clock ticks, one per match or insert): raw
  counts would protect the old nodes of a conversation over its equally-needed young
  ones. Its second factor decays with idle time, as LRU does: a context that stopped
  being used (an agent that started a new task, a closed chat) loses its claim however
  often it was hit before. ``τ`` (default 32 ticks, ~10 requests) damps both for
  brand-new nodes, whose single hit over a tiny lifetime says little.

Worked example (SmolLM2-135M constants: linear ≈ 0.21 GFLOP/token, attention ≈ 69 kFLOP/key):
a shared 1k-token system prompt S hit 10 times, and two 8k-token documents A, B below
it, created at the same time, each hit 5 times, all just used; 1k tokens must go. One slot
of S costs ≈ 0.21 G + 69 k·500 ≈ 0.25 GFLOP, at twice A's rate: 0.49 (in units of A's rate); a slot
in the first 1k of A costs ≈ 0.21 + 69 k·1.5 k ≈ 0.31 GFLOP; a slot in A's last 1k costs
≈ 0.21 + 69 k·8.5 k ≈ 0.80 GFLOP. So cost-aware punches a hole at the START of A (or B),
keeping S and the expensive tails, while lru-leaf drops a tail, which costs ~2.5× more
per slot to recompute — and, the cache being prefix-closed, a returning request then
recomputes the whole tail rather than a cheap hole.

``priority-cost`` — SGLang's request priorities first, ``cost-aware`` within one priority.

``benchmarks/simulate_eviction.py`` compares ``cost-aware`` and ``lru-leaf`` on traces; its table is
in the README.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Protocol

from sglang_holes.cache.leaf_policies import (
    TreeView,
    evictable,
    lru_leaf,
    sglang_lfu,
    sglang_lru,
    sglang_priority,
    sglang_slru,
)
from sglang_holes.cache.node import Node
from sglang_holes.cache.recompute_cost import SMOLLM2_135M, RecomputeCost


class EvictionPolicy(Protocol):
    name: str
    partial: bool  # may evict the head of a node

    def victims(self, tree: TreeView, num_tokens: int) -> Iterator[Node]:
        """Yield cached, unlocked nodes to evict for ``num_tokens`` slots, best first; lazily
        (the tree evicts each yielded node, or its head, before asking for the next)."""
        ...



class CostAware:
    """``cost-aware``; with ``by_priority`` (``priority-cost``), SGLang's request priorities first: KV
    only lower-priority requests inserted goes before any of a higher priority, cost-aware within one."""

    partial = True

    def __init__(self, cost: RecomputeCost, tau: float = 32.0, by_priority: bool = False):
        if tau <= 0:
            raise ValueError("tau must be > 0")
        self.cost = cost
        self.tau = tau
        self.by_priority = by_priority
        self.name = "priority-cost" if by_priority else "cost-aware"

    def _key(self, n: Node, chunk: int, now: int) -> tuple[int, float]:
        return (n.priority if self.by_priority else 0, self.priority(n, chunk, now))

    def priority(self, n: Node, chunk: int, now: int) -> float:
        """Of the part that would go: the node's head of ``chunk`` tokens (all of a shorter node)."""
        c = min(chunk, len(n.key))
        reuse = max(n.hits, 1) / (now - n.created + self.tau) * self.tau / (now - n.last_access + self.tau)
        return reuse * self.cost.span(n.start, n.start + c) / c

    def victims(self, tree: TreeView, num_tokens: int) -> Iterator[Node]:
        P = tree.page_size
        chunk = max(P, -(-num_tokens // P) * P)
        tie = itertools.count()
        now = tree.now
        heap = [(self._key(n, chunk, now), next(tie), n) for n in tree.nodes()
                if n.slots is not None and n.lock_ref == 0]
        heapq.heapify(heap)
        while heap:
            _, _, n = heapq.heappop(heap)
            if not evictable(n):
                continue
            yield n
            if evictable(n):  # only its head was evicted; the rest stays a candidate
                heapq.heappush(heap, (self._key(n, chunk, now), next(tie), n))


def _cost_aware(recompute_cost: RecomputeCost | None, tau: float = 32.0, by_priority: bool = False) -> CostAware:
    return CostAware(recompute_cost or SMOLLM2_135M, tau=float(tau), by_priority=by_priority)


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
    "lru-leaf": (), "cost-aware": ("tau",), "priority-cost": ("tau",),
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
