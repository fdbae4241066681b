"""The eviction simulator, replaying exactly what the engine does with a sequential request stream.

``replay(policy, requests, pool)`` predicts, per request, the prompt tokens the ``holes`` engine
computes and their FLOPs, from a ``HoleTree`` with the same policy and pool, doing what SGLang
0.5.23 does around it for one request at a time (page size 1, 1-token generations, every prompt
within one chunked-prefill piece):

* the match covers the prompt but its last token (SGLang always computes the last position: its
  logits are the answer), and admission locks the matched path;
* the extend allocates one slot per missing position; if the pool falls short, the cache is asked
  to evict exactly the shortfall (``evict_to_free_tokens``), never what the request locked;
* the finished request's prompt goes into the tree (duplicates freed), then its lock is released.

FLOPs are ``RecomputeCost.span`` (attention + linear layers) of every computed span, the model's
constants; the engine side reads the same spans from ``meta_info["hole_spans"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_holes import HoleTree, RecomputeCost, make_policy


@dataclass(frozen=True)
class Outcome:
    """One request: prompt tokens computed, their FLOPs, and whether it filled holes."""

    computed: int
    flops: float
    holes: bool


def span_flops(spans: list[tuple[int, int]] | list[list[int]], cost: RecomputeCost) -> float:
    return sum(cost.span(s, e) for s, e in spans)


def replay(policy: str, requests: list[list[int]], pool: int, cost: RecomputeCost) -> list[Outcome]:
    tree = HoleTree(policy=make_policy(policy, cost))
    free = torch.arange(1, pool + 1)  # slot 0 is SGLang's padding slot
    out = []
    for prompt in requests:
        n = len(prompt)
        match = tree.match(prompt[:-1])
        spans = [(s, e) for s, e in match.missing if e <= n - 1] + [(n - 1, n)]
        spans = _merge(spans)
        tree.lock(match.handle)
        need = n - match.reused_tokens
        short = need - free.numel()
        if short > 0:
            free = torch.cat([free, tree.evict(min(short, tree.evictable_size))])
        if need > free.numel():
            raise RuntimeError(f"the pool of {pool} tokens cannot hold a request of {n} tokens")
        row = torch.empty(n, dtype=torch.int64)
        computed = torch.ones(n, dtype=torch.bool)
        for s, e, slots in match.segments:
            if slots is not None:
                row[s:e] = slots
                computed[s:e] = False
        new, free = free[:need], free[need:]
        row[computed] = new
        free = torch.cat([free, tree.insert(prompt, row).rejected_slots])
        tree.unlock(match.handle)
        # A hole request: KV reused beyond the first missing position (the engine's fill path).
        out.append(Outcome(need, span_flops(spans, cost), match.reused_tokens > match.cached_prefix_len))
    tree.check_integrity()
    return out


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and out[-1][1] >= s:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out
