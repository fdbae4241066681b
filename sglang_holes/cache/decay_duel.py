"""``DecayDuel``: which of ``cost-aware``'s decay times the cache follows, chosen by replaying the stream.

No single decay serves every stream (``benchmarks/results/policy_streams.md``). Counting hits over a
long time (frequency) keeps the documents of popular chat sessions, which return; but an agent's
transcript that was read at every step of a finished task keeps that claim too, and displaces the live
contexts of rarer agents. Counting only recent hits (recency) is right there, and wrong for the chat
sessions; and on some streams a decay in between beats both. What the server can do is try several:
``DecayDuel`` keeps one *shadow* cache per decay, a ``HoleTree`` of the same capacity that holds token
ids and no KV, runs ``cost-aware`` with that decay alone, and is shown every finished request's
prompt. Each shadow counts the prompt FLOPs it would have computed for each request (``RecomputeCost``);
the real cache follows the shadow that recently computed least, by the rule below (``CostAware.follow``),
and starts with the first decay (recency, the closest to SGLang's ``lru``).

This is set dueling (Qureshi et al., "Adaptive insertion policies for high performance caching",
ISCA 2007) with whole shadow caches instead of sampled sets: the shadows hold no KV, so the price is
the token ids of one pool per decay on the host (a tuple entry and a placeholder slot per token, and
the token's int object where nothing else holds it: at most ~45 bytes, ~180 MB for a 1M-token pool
with four decays) and, per finished request, one match, eviction and insert of its prompt in each shadow (~2 ms for a
6k-token prompt with four shadows on a 2-core Xeon: ``benchmarks/results/eviction_time.md``).

A shadow serves a prompt as the engine serves one request alone: the match covers all but the last
token, the missing positions and the last are computed (their FLOPs), the shortfall is evicted with
the matched path locked, and the prompt is inserted. With ``forget=1`` a shadow's count is exactly
``benchmarks/policy_replay.replay`` of that decay without chunked prefill
(``tests/test_decay_duel.py``).

**When to move.** Over the recent requests (the last ~1/(1-``forget``), each weighted by ``forget`` per
request since), a shadow's *gain* is the FLOPs it computed less than the followed decay's shadow. The
cache moves to the decay with the largest gain *without its single best request*, when that is > 0: one
lucky hit, where only one shadow kept what a request read, does not move the cache. Moving on it did
(the rule until 2026-12-07): on short agent streams a frequency shadow won one request, the cache
switched, and its contents, kept by recency until then, lost to both shadows for the rest of the
stream, up to 20% more FLOPs than ``lru`` over 40 requests; leaving out the best request keeps those
cells within 1% of ``lru`` at nearly the same savings on chat (``benchmarks/results/duel_warmup.md``).
With ``switch_confidence`` z > 0 the cache moves only when a shadow computed less than the followed
one's per request by more than z standard errors of that difference: a paired test on the shadows'
per-request FLOPs, slower still to move (within 1% of ``lru`` on every stream there, at lower savings
on chat's first requests).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence

import torch

from sglang_holes.cache.eviction import CostAware
from sglang_holes.cache.tree import HoleTree


class ShadowCache:
    """A KV-less ``HoleTree`` of ``capacity`` tokens under ``cost-aware`` with one decay; counts its FLOPs."""

    def __init__(self, policy: CostAware, capacity: int, page_size: int) -> None:
        self.tree = HoleTree(page_size=page_size, policy=policy)
        self.cost = policy.cost
        self.capacity = capacity
        self.flops = 0.0  # decayed: what it computed recently
        self._next_slot = 0  # placeholder slot ids, unique so the tree's ownership checks hold

    def serve(self, prompt: Sequence[int], forget: float) -> float:
        """Serve one prompt (token ids, at least one); returns the FLOPs this shadow computed for it."""
        tree, n = self.tree, len(prompt)
        match = tree.match(prompt[: n - 1])
        flops = sum(self.cost.span(s, e) for s, e in match.missing) + self.cost.span(n - 1, n)
        need = sum(e - s for s, e in match.missing) + 1  # SGLang always computes the last position
        tree.lock(match.handle)
        over = tree.total_size + need - self.capacity
        if over > 0:
            tree.evict(min(over, tree.evictable_size))
        tree.unlock(match.handle)
        slots = torch.arange(self._next_slot, self._next_slot + n)
        self._next_slot += n
        tree.insert(prompt, slots, owned=torch.ones(n, dtype=torch.bool))
        self.flops = self.flops * forget + flops
        return flops


class DecayDuel:
    """Shadow caches for each of ``policy.decays``; ``observe`` moves ``policy.lead`` by the rule of the
    module docstring.

    ``capacity``: the KV pool's size in tokens (what the real cache can hold at most). ``forget``: the
    weight of a request's FLOPs per request observed since (0.97: about the last 33 requests decide). A
    new duel moves ``policy`` back to its first decay (fresh shadows have no evidence yet): create it
    before the trees that use the policy hold anything, or ``reindex`` them. The rule reads
    ``policy.switch_confidence``.
    """

    WINDOW_MAX = 1000  # requests the rule looks back at most (forget=1 would keep them all)

    def __init__(self, policy: CostAware, capacity: int, page_size: int = 1, forget: float = 0.97) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be > 0 tokens")
        if not 0 < forget <= 1:
            raise ValueError("forget must be in (0, 1]")
        self.policy = policy
        self.forget = forget
        self.shadows = [ShadowCache(CostAware(policy.cost, (d,)), capacity, page_size) for d in policy.decays]
        # At least 2: with 1 the gain without the best request is never > 0 and the default rule never moves.
        window = self.WINDOW_MAX if forget == 1 else max(2, min(self.WINDOW_MAX, round(1 / (1 - forget))))
        self.recent: deque[tuple[float, ...]] = deque(maxlen=window)  # per request: each shadow's FLOPs
        self.observed = 0
        self.switches = 0
        policy.follow(0)

    @property
    def switch_confidence(self) -> float:
        """z of the paired test; 0: move on the gain without the best request (module docstring)."""
        return self.policy.switch_confidence

    def observe(self, prompt: Sequence[int], trees: Iterable[HoleTree] = ()) -> bool:
        """A request with this prompt finished: serve it in every shadow, then apply the rule. When the lead
        changes, the victim index of each of ``trees`` (the real cache's) is rebuilt; returns whether it
        changed."""
        if len(prompt) < 1:
            return False
        self.recent.append(tuple(shadow.serve(prompt, self.forget) for shadow in self.shadows))
        self.observed += 1
        best = self.choice()
        if best == self.policy.lead or not self.policy.follow(best):
            return False
        self.switches += 1
        for tree in trees:
            tree.reindex()
        return True

    def choice(self) -> int:
        """The decay the cache should follow now (an index of ``policy.decays``)."""
        lead = self.policy.lead
        if not self.recent:  # nothing observed yet: no evidence to move on
            return lead
        weights = self.weights()
        others = [d for d in range(len(self.shadows)) if d != lead]
        if self.switch_confidence == 0:
            gains = {d: self.robust_gain(d, lead, weights) for d in others}
        else:
            tests = {d: self.paired_gain(d, lead, weights) for d in others}
            gains = {d: mean for d, (mean, se) in tests.items() if mean > self.switch_confidence * se}
        best = max(gains, key=gains.__getitem__, default=lead)
        return best if best != lead and gains[best] > 0 else lead

    def weights(self) -> list[float]:
        """Each recent request's weight, oldest first: ``forget`` per request observed since."""
        n = len(self.recent)
        return [self.forget ** (n - 1 - i) for i in range(n)]

    def robust_gain(self, d: int, lead: int, weights: Sequence[float] | None = None) -> float:
        """The FLOPs decay ``d``'s shadow computed less than ``lead``'s over the recent requests (``weights``,
        default ``self.weights()``), leaving out the request where it gained most. At least one request
        observed."""
        w = self.weights() if weights is None else weights
        terms = [a * (r[lead] - r[d]) for a, r in zip(w, self.recent, strict=True)]
        gain = math.fsum(terms) - max(0.0, max(terms, default=0.0))
        # Within rounding of 0 is 0: right after a switch no other decay gains over the new lead in exact
        # arithmetic (so check_integrity's re-run of choice() agrees), and rounding must not make one.
        return 0.0 if abs(gain) <= 1e-9 * math.fsum(map(abs, terms)) else gain

    def paired_gain(self, d: int, lead: int, weights: Sequence[float] | None = None) -> tuple[float, float]:
        """How many FLOPs per recent request decay ``d``'s shadow computed less than ``lead``'s (weighted as in
        ``robust_gain``), and the standard error of that mean. At least one request observed."""
        w = self.weights() if weights is None else weights
        diffs = [r[lead] - r[d] for r in self.recent]
        total = sum(w)
        mean = sum(a * x for a, x in zip(w, diffs, strict=True)) / total
        var = sum(a * (x - mean) ** 2 for a, x in zip(w, diffs, strict=True)) / total
        n_eff = total * total / sum(a * a for a in w)
        return mean, math.sqrt(var / n_eff)

    def check_integrity(self) -> None:
        """One sound shadow per decay, and the policy follows the decay ``choice`` picks."""
        assert len(self.shadows) == len(self.policy.decays), "a shadow per decay"
        assert self.choice() == self.policy.lead, "following another decay than the duel chose"
        for shadow in self.shadows:
            shadow.tree.check_integrity()


def make_duel(policy: object, capacity: int, page_size: int = 1) -> DecayDuel | None:
    """The duel for ``policy`` when it is a ``cost-aware`` with several decays; None otherwise (nothing to choose)."""
    if isinstance(policy, CostAware) and len(policy.decays) > 1:
        return DecayDuel(policy, capacity, page_size)  # switch_confidence: the policy's
    return None
