"""The incremental victim search (``HeapIndex``) against the full scan (``ScanIndex``): on random operation
sequences (inserts, matches through holes, locks, evictions of every size, span evictions, SGLang's
checkpoint stamps, ``cost-aware`` switching decays) two trees, one per search, evict the same KV in the same
order, for every policy."""

from __future__ import annotations

import random

import pytest
import torch

from sglang_holes import HoleTree, make_policy
from sglang_holes.cache.eviction import EVICTION_POLICIES, CostAware
from sglang_holes.cache.leaf_policies import checkpoint_like_sglang
from sglang_holes.cache.victim_index import HeapIndex, ScanIndex


def _prompts(rng: random.Random, n: int) -> list[list[int]]:
    """Sessions that grow and branch under a shared prefix, so the tree has interior nodes and holes."""
    shared = [rng.randrange(1, 50) for _ in range(12)]
    sessions = [list(shared) for _ in range(5)]
    out = []
    for _ in range(n):
        s = rng.randrange(len(sessions))
        sessions[s] = sessions[s] + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 20))]
        out.append(list(sessions[s]) if rng.random() < 0.8 else sessions[s][: rng.randrange(1, len(sessions[s]) + 1)])
    return out


def _step(tree: HoleTree, rng: random.Random, prompt: list[int], free: list[int], locked: list) -> list:
    """One operation chosen by ``rng``; returns what it observed (compared between the two trees)."""
    op = rng.random()
    if op < 0.45:
        m = tree.match(prompt)
        slots = torch.empty(len(prompt), dtype=torch.int64)
        for seg in m.segments:
            slots[seg.start : seg.end] = seg.slots if seg.slots is not None else torch.tensor(
                [free.pop() for _ in range(seg.end - seg.start)], dtype=torch.int64)
        result = checkpoint_like_sglang(tree, prompt, slots, prompt_len=max(1, len(prompt) - 3),
                                        priority=rng.randrange(3))
        free.extend(result.rejected_slots.tolist())
        return ["insert", m.missing, result.rejected_slots.tolist()]
    if op < 0.6:
        m = tree.match(prompt)
        if rng.random() < 0.5:
            tree.lock(m.handle)
            locked.append(m.handle)
        return ["match", m.missing]
    if op < 0.7 and locked:
        tree.unlock(locked.pop(rng.randrange(len(locked))))
        return ["unlock"]
    if op < 0.8:
        m = tree.match(prompt)
        cached = [(s.start, s.end) for s in m.segments if s.slots is not None and s.end - s.start >= 2]
        if cached:
            s, e = rng.choice(cached)
            try:
                freed = tree.evict_span(prompt, s + 1, e)
            except ValueError as err:  # locked KV in the span: refused, tree unchanged
                return ["evict_span refused", str(err)]
            free.extend(freed.tolist())
            return ["evict_span", freed.tolist()]
        return ["evict_span none"]
    n = min(rng.choice([1, 3, 8, 30]), tree.evictable_size)
    freed = tree.evict(n)
    free.extend(freed.tolist())
    return ["evict", freed.tolist()]


@pytest.mark.parametrize("policy", sorted(EVICTION_POLICIES))
@pytest.mark.parametrize("seed", range(6))
def test_the_heap_evicts_what_the_scan_evicts(policy: str, seed: int) -> None:
    fast = HoleTree(policy=make_policy(policy))
    slow = HoleTree(policy=make_policy(policy), reference_search=True)
    assert isinstance(fast.index, HeapIndex) and isinstance(slow.index, ScanIndex)
    rngs = [random.Random(seed), random.Random(seed)]
    frees = [list(range(4000, 0, -1)), list(range(4000, 0, -1))]
    locks: list[list] = [[], []]
    prompts = _prompts(random.Random(100 + seed), 120)
    for i, prompt in enumerate(prompts):
        seen = [_step(t, rng, prompt, free, lk) for t, rng, free, lk in zip((fast, slow), rngs, frees, locks,
                                                                            strict=True)]
        assert seen[0] == seen[1], f"operation {i}: heap {seen[0]} vs scan {seen[1]}"
        if isinstance(fast.policy, CostAware) and i % 7 == 3:  # DecayDuel moves the lead: every key changes
            lead = (i // 7) % len(fast.policy.decays)
            for tree in (fast, slow):
                if tree.policy.follow(lead):
                    tree.reindex()
        fast.check_integrity()
        slow.check_integrity()
    assert sorted(fast.owned_slots().tolist()) == sorted(slow.owned_slots().tolist())
