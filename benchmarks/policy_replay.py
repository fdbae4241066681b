"""The eviction simulator, replaying exactly what the engine does with a sequential request stream.

``replay(policy, requests, pool, cost, chunk)`` predicts, per request, the prompt tokens the
``holes`` engine computes and their FLOPs, from a ``HoleTree`` with the same policy and pool,
doing what SGLang 0.5.23 does around it for one request at a time (page size 1, 1-token
generations):

* the match covers the prompt but its last token (SGLang always computes the last position: its
  logits are the answer), and admission locks the matched path;
* the missing positions are prefilled in position order, in pieces of ``chunk`` (SGLang's
  chunked prefill); each piece allocates one slot per position, and if the pool falls short the
  cache is asked to evict exactly the shortfall (``evict_to_free_tokens``), never what the request
  locked; after each piece the checkpoint inserts everything before the first position not yet
  computed, which the request then keeps locked, and counts SGLang's per-node hit (what ``lfu`` and
  ``slru`` read) only on nodes past what the request's earlier pieces inserted;
* the finished request's prompt goes into the tree (duplicates freed), then its locks are released,
  and (``cost-aware``) the ``DecayDuel`` sees the prompt, as the engine's cache does when it releases
  a finished request.

FLOPs are ``RecomputeCost.span`` (attention + linear layers) of every computed span, the model's
constants; the engine side reads the same spans from ``meta_info["hole_spans"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from sglang_holes import HoleTree, RecomputeCost, make_policy
from sglang_holes.cache.decay_duel import DecayDuel, make_duel
from sglang_holes.cache.eviction import CostAware, EvictionPolicy
from sglang_holes.cache.leaf_policies import TreeView, checkpoint_like_sglang
from sglang_holes.cache.node import Node
from sglang_holes.cache.victim_index import ScanIndex


@dataclass(frozen=True)
class Outcome:
    """One request: prompt tokens computed, their FLOPs, and whether it filled holes."""

    computed: int
    flops: float
    holes: bool


def span_flops(spans: list[tuple[int, int]] | list[list[int]], cost: RecomputeCost) -> float:
    return sum(cost.span(s, e) for s, e in spans)


class Clairvoyant(CostAware):
    """A reference no server can run: ``cost-aware``'s key with the decayed hit count replaced by
    1 / (requests until the next one that reads the node), known from the stream (0: never read
    again). Not the optimum (none is known for partial, cost-weighted eviction), but what knowing
    the future buys the same per-slot rule: how far an online estimate of reuse is from it. Its key
    changes as the stream advances, so it searches by scanning (``ScanIndex``)."""

    def __init__(self, requests: list[list[int]], cost: RecomputeCost):
        super().__init__(cost, decays=(1.0,))  # its key reads no hit count: nothing to duel over
        self.name = "clairvoyant"
        self.requests = requests
        self.at = 0  # the request being served (``replay`` sets it)

    def key(self, node: Node) -> tuple[int, float]:
        return (0, self.cost.span(node.start, node.start + 1) * self.reuse(node))

    def reuse(self, node: Node) -> float:
        for j in range(self.at + 1, len(self.requests)):
            r = self.requests[j]
            if len(r) > node.end and tuple(r[node.start : node.end]) == node.key:
                return 1.0 / (j - self.at)
        return 0.0

    def index(self, tree: TreeView) -> ScanIndex:
        return ScanIndex(self, tree)


class Replayed(NamedTuple):
    """What ``run`` leaves: per request, what the engine computes; the tree and the duel (or None) after."""

    outcomes: list[Outcome]
    tree: HoleTree
    duel: DecayDuel | None


def replay(policy: str | EvictionPolicy, requests: list[list[int]], pool: int, cost: RecomputeCost,
           chunk: int | None = None) -> list[Outcome]:
    """Per request, what the engine computes (``run(...).outcomes``)."""
    return run(policy, requests, pool, cost, chunk).outcomes


def run(policy: str | EvictionPolicy, requests: list[list[int]], pool: int, cost: RecomputeCost,
        chunk: int | None = None) -> Replayed:
    """Serve ``requests`` (prompts, token ids) in order from a ``pool`` of tokens. ``policy``: a registered
    name, or a policy object (``Clairvoyant``). ``chunk``: SGLang's chunked-prefill size (None: every
    request in one piece): a request computing more is prefilled in pieces of ``chunk`` positions, each
    allocated (evicting the shortfall) and checkpointed into the tree before the next."""
    tree = HoleTree(policy=make_policy(policy, cost) if isinstance(policy, str) else policy)
    duel = make_duel(tree.policy, pool)
    free = torch.arange(1, pool + 1)  # slot 0 is SGLang's padding slot
    out = []
    for i, prompt in enumerate(requests):
        if isinstance(policy, Clairvoyant):
            policy.at = i
        n = len(prompt)
        match = tree.match(prompt[:-1])
        handles = [match.handle]
        tree.lock(match.handle)
        row = torch.empty(n, dtype=torch.int64)
        computed = torch.ones(n, dtype=torch.bool)
        for s, e, slots in match.segments:
            if slots is not None:
                row[s:e] = slots
                computed[s:e] = False
        order = computed.nonzero().flatten()  # virtual order: the missing positions, ascending
        need, done, inserted = order.numel(), 0, 0
        while done < need:
            piece = order[done : done + (chunk or need)]
            short = piece.numel() - free.numel()
            if short > 0:
                free = torch.cat([free, tree.evict(min(short, tree.evictable_size))])
            if piece.numel() > free.numel():
                raise RuntimeError(f"the pool of {pool} tokens cannot hold a piece of {piece.numel()} tokens")
            row[piece], free = free[: piece.numel()], free[piece.numel() :]
            done += piece.numel()
            up_to = n if done == need else int(order[done])  # everything before the first uncomputed position
            # The checkpoint after each piece, with SGLang's statistics: a node counts one hit per request
            # (none for what its earlier pieces inserted), then the path is re-matched.
            result = checkpoint_like_sglang(tree, prompt[:up_to], row[:up_to], prompt_len=n, inserted_len=inserted)
            inserted = up_to
            free = torch.cat([free, result.rejected_slots])
            if done < need:  # the request keeps reading what it handed to the tree
                tree.lock(result.handle)
                handles.append(result.handle)
        for handle in handles:
            tree.unlock(handle)
        if duel is not None:
            duel.observe(prompt, [tree])
        spans = _merge([(s, e) for s, e in match.missing if e <= n - 1] + [(n - 1, n)])
        # A hole request: KV reused beyond the first missing position (the engine's fill path).
        out.append(Outcome(need, span_flops(spans, cost), match.reused_tokens > match.cached_prefix_len))
    tree.check_integrity()
    return Replayed(out, tree, duel)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and out[-1][1] >= s:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out
