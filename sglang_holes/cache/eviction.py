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
  or insert). Every hit on a descendant passes through its ancestors, so a shared system prompt or
  document prefix accumulates the hits of everything below it and is the last to go.
* The decay is the same for every node, so ``exp(now / decay)`` factors out of every key: the
  order of two nodes changes only when one of them is hit or changes shape. ``key`` is kept as
  ``log(cost) + log Σ exp(tᵢ / decay)``, constant between the tree's updates, and the victim search
  is a heap (``victim_index.HeapIndex``), O(log n) per victim instead of a scan of the tree.
* **Which decay.** A long decay counts frequency: the documents of popular chat sessions, which
  return, stay. But the transcript of an agent that finished its task was read at every step and
  keeps that claim too, displacing the live contexts of rarer agents; there a short decay (recency)
  is right. On ``benchmarks/bench_policy_streams.py``'s streams (default seed, seeds 10-11) a decay
  of 32 ticks computes 4-19% fewer FLOPs than 8 on Zipf chat at 25-50% cache, but 12-19% more than
  ``lru`` on agent transcripts at 10-25%, where 2 ticks never computes more than ``lru``; on
  ``benchmarks/simulate_eviction.py``'s 120k-token agent trace 8 beats both. So ``cost-aware`` keeps
  a count per decay on every node (``decays`` = 2, 8, 32 and 128 ticks) and follows one:
  ``DecayDuel`` (``decay_duel``) replays every finished request in KV-less shadow caches of the
  pool's size, one per decay, and the real cache orders by the decay whose shadow recently computed
  the fewest FLOPs, not counting the request where it gained most (switching rebuilds the heap,
  O(n log n), rarely).
  ``--radix-eviction-policy-config '{"decay": d}'`` fixes one decay instead (no shadows).

An earlier form, ``hit rate × recency × cost of the evicted head``, was not time-invariant (it needed
a scan per eviction) and computed 11-12% more FLOPs than ``lru`` on the agent stream; a single decay
of 8 ticks (the next form) stayed within 1.3% of ``lru`` there but saved only 14-21% on chat, where
following the best of the four saves 18-29% (``benchmarks/results/policy_streams.md``).

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

# cost-aware's decay times (tree ticks) without a ``decay`` parameter, from recency (2) to frequency
# (128); ``DecayDuel`` chooses which one the key reads.
DEFAULT_DECAYS = (2.0, 8.0, 32.0, 128.0)


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
    only lower-priority requests inserted goes before any of a higher priority, cost-aware within one.

    ``decays``: the decay times (tree ticks) it keeps a decayed hit count for, one per node each;
    ``lead`` indexes the one the key reads. With more than one, ``DecayDuel`` (``decay_duel``) moves
    the lead to whichever decay would have computed the fewest recent FLOPs, not counting its luckiest
    request (``follow``)."""

    partial = True
    leaves_only = False

    def __init__(self, cost: RecomputeCost, decays: tuple[float, ...] = DEFAULT_DECAYS, by_priority: bool = False,
                 switch_confidence: float = 0.0):
        if not decays or any(not d > 0 for d in decays):
            raise ValueError("decay must be > 0")
        if not switch_confidence >= 0:
            raise ValueError("switch_confidence must be >= 0")
        self.cost = cost
        self.switch_confidence = float(switch_confidence)  # the duel's (decay_duel.DecayDuel)
        self.decays = tuple(float(d) for d in decays)
        self.lead = 0
        self.by_priority = by_priority
        self.name = "priority-cost" if by_priority else "cost-aware"

    @property
    def decay(self) -> float:
        """The decay time the key reads now (ticks)."""
        return self.decays[self.lead]

    def follow(self, lead: int) -> bool:
        """Order by the hit counts of ``decays[lead]`` from now on. True when that changes every key: the
        caller rebuilds its trees' victim indexes (``HoleTree.reindex``)."""
        if not 0 <= lead < len(self.decays):
            raise ValueError(f"lead {lead} is not one of the {len(self.decays)} decays")
        changed, self.lead = lead != self.lead, lead
        return changed

    def hit(self, node: Node, now: int) -> None:
        logs = node.log_crf or (-math.inf,) * len(self.decays)
        node.log_crf = tuple(_log_add_exp(log, now / d) for log, d in zip(logs, self.decays, strict=True))

    def key(self, node: Node) -> tuple[int, float]:
        first = self.cost.span(node.start, node.start + 1)  # its cheapest slot, the first to go
        cost = math.log(first) if first > 0 else -math.inf
        crf = node.log_crf[self.lead] if node.log_crf else -math.inf
        return (node.priority if self.by_priority else 0, cost + crf)

    def crf(self, node: Node, now: int) -> float:
        """The node's decayed hit count at tick ``now`` under the lead decay (what ``key`` orders by, without
        the common factor)."""
        return math.exp(node.log_crf[self.lead] - now / self.decay) if node.log_crf else 0.0

    def index(self, tree: TreeView) -> HeapIndex:
        return HeapIndex(self, tree)


def _log_add_exp(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) without overflow (``numpy.logaddexp`` costs ~1 µs per scalar call; this, per hit,
    a tenth of that)."""
    hi, lo = (a, b) if a >= b else (b, a)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def _cost_aware(recompute_cost: RecomputeCost | None, decay: float | None = None,
                by_priority: bool = False, switch_confidence: float = 0.0) -> CostAware:
    if decay is not None and switch_confidence:
        raise ValueError("switch_confidence applies to the decay duel: not with one fixed decay")
    decays = DEFAULT_DECAYS if decay is None else (float(decay),)
    return CostAware(recompute_cost or SMOLLM2_135M, decays=decays, by_priority=by_priority,
                     switch_confidence=switch_confidence)


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
    "lru-leaf": (), "cost-aware": ("decay", "switch_confidence"), "priority-cost": ("decay", "switch_confidence"),
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
