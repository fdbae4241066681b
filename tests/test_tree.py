"""HoleTree: exact expectations on small hand-built trees."""

from __future__ import annotations

import math

import pytest
import torch

from sglang_holes import HoleTree, RecomputeCost
from sglang_holes.cache.eviction import make_policy
from sglang_holes.cache.recompute_cost import LLAMA3_8B, SMOLLM2_135M


def snapshot(tree: HoleTree):
    return sorted((n.start, n.key, None if n.slots is None else tuple(n.slots.tolist()), n.lock_ref)
                  for n in tree.nodes()), tree.evictable_size, tree.protected_size


def seg(result):
    return [(s, e, None if sl is None else sl.tolist()) for s, e, sl in result.segments]


def test_match_splits_node_and_reports_tail():
    t = HoleTree()
    t.insert([1, 2, 3, 4, 5], [10, 11, 12, 13, 14])
    r = t.match([1, 2, 3, 9])
    assert seg(r) == [(0, 3, [10, 11, 12]), (3, 4, None)]
    assert r.missing == [(3, 4)] and r.reused_tokens == 3 and r.cached_prefix_len == 3
    assert sorted(n.key for n in t.nodes()) == [(1, 2, 3), (4, 5)]  # split at the boundary
    t.check_integrity()


def test_insert_over_a_hole_and_identity_aware_rejection():
    t = HoleTree()
    t.insert(list(range(8)), list(range(100, 108)))
    assert t.evict_span(list(range(8)), 2, 5).tolist() == [102, 103, 104]
    r = t.match(list(range(8)))
    assert seg(r) == [(0, 2, [100, 101]), (2, 5, None), (5, 8, [105, 106, 107])]
    assert r.missing == [(2, 5)] and r.reused_tokens == 5 and r.cached_prefix_len == 2
    # The request recomputed the hole into new slots 7, 8, 9 and passes its whole row:
    before = t.total_size
    out = t.insert(list(range(8)), [100, 101, 7, 8, 9, 105, 106, 107])
    assert out.rejected_slots.tolist() == [] and t.total_size == before + 3
    assert seg(t.match(list(range(8)))) == [(0, 8, [100, 101, 7, 8, 9, 105, 106, 107])]
    # A duplicate computation with all-new slots: every one is rejected (the caller frees them).
    out = t.insert(list(range(8)), list(range(50, 58)))
    assert out.rejected_slots.tolist() == list(range(50, 58)) and t.total_size == before + 3
    t.check_integrity()


def test_locked_interior_node_survives_eviction():
    t = HoleTree(policy=make_policy("cost-aware"))
    t.insert(list(range(10)), list(range(10)))
    t.insert([*range(10), 50, 51], list(range(12)))
    t.insert([*range(10), 60, 61], [*range(10), 20, 21])
    h = t.match(list(range(6))).handle  # the node for positions [0, 6) after a split
    t.lock(h)
    t.check_integrity()
    assert t.protected_size == 6
    freed = t.evict(t.evictable_size)
    assert sorted(freed.tolist()) == [6, 7, 8, 9, 10, 11, 20, 21]
    assert seg(t.match(list(range(6)))) == [(0, 6, [0, 1, 2, 3, 4, 5])]
    with pytest.raises(ValueError, match="only 0 are evictable"):
        t.evict(1)
    t.unlock(h)
    assert t.evictable_size == 6
    t.check_integrity()


def test_lru_leaf_evicts_least_recent_leaves_only():
    t = HoleTree(policy=make_policy("lru-leaf"))
    t.insert([1, 2, 3, 4], [0, 1, 2, 3])
    t.insert([1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5])  # leaf A = [5, 6]
    t.insert([1, 2, 7, 8], [0, 1, 6, 7])  # leaf B = [7, 8]
    t.match([1, 2, 3, 4, 5, 6])  # A (and its ancestors) now most recent
    assert t.evict(1).tolist() == [6, 7]  # B: least recently used leaf, whole node
    assert t.evict(3).tolist() == [4, 5, 2, 3]  # then A, then its parent [3, 4] became a leaf
    assert seg(t.match([1, 2, 3, 4, 5, 6])) == [(0, 2, [0, 1]), (2, 6, None)]  # still prefix-closed
    t.check_integrity()


def test_cost_aware_punches_holes_at_cheap_positions():
    """The module docstring's worked example: shared prompt S (hit 10x) and two long
    documents A, B below it (hit 5x each): holes go to the START of A and B, not their tails."""
    t = HoleTree(policy=make_policy("cost-aware", SMOLLM2_135M))
    S = list(range(1000))
    A = S + [100_000 + i for i in range(8000)]
    B = S + [200_000 + i for i in range(8000)]
    t.insert(A, torch.arange(9000))
    t.insert(B, torch.cat([torch.arange(1000), torch.arange(9000, 17000)]))
    for _ in range(4):  # hits: S 1 (insert) + 8 + 1 (below) = 10; A, B 1 + 4 = 5 each
        t.match(A)
        t.match(B)
    t.match(S)
    freed = t.evict(1000)
    assert freed.numel() == 1000
    r = t.match(A if bool((freed < 9000).all()) else B)
    assert r.missing == [(1000, 2000)] and r.cached_prefix_len == 1000  # a hole right after S
    assert seg(t.match(S))[0][2] is not None  # S untouched

def _finished_and_live(**params: float) -> HoleTree:
    """A shared 4k-token prompt S (slots 0-3999); below it a 4k-token transcript (4000-7999) hit 40 times
    in a row, then never again (an agent that started over); a 2k-token context (8000-9999) read with S
    every sixth tick since, ten times."""
    t = HoleTree(policy=make_policy("cost-aware", SMOLLM2_135M, **params))
    S = list(range(4000))
    t.insert(S + [100_000 + i for i in range(4000)], torch.arange(8000))
    for _ in range(40):
        t.match(S + [100_000 + i for i in range(4000)])
    t.insert([200_000 + i for i in range(2000)], torch.arange(8000, 10_000))
    for _ in range(10):
        t.match([200_000 + i for i in range(2000)])
        t.match(S)
        for _ in range(4):
            t.match([7])
    return t


def test_cost_aware_lets_a_finished_context_go_before_a_live_one():
    """Decay: long idle, the transcript goes first; without decay (decay → ∞, LFU by cost) its many hits
    and deep, costly positions would keep it over the live context."""
    t = _finished_and_live()
    freed = t.evict(500)
    assert bool(((freed >= 4000) & (freed < 8000)).all())
    assert t.match([200_000 + i for i in range(2000)]).missing == []
    t.check_integrity()
    assert bool((_finished_and_live(decay=1e9).evict(500) >= 8000).all())


def test_cost_aware_partial_eviction_splits_the_head():
    t = HoleTree(policy=make_policy("cost-aware"), page_size=2)
    t.insert(list(range(10)), list(range(10)))
    assert t.evict(3).tolist() == [0, 1, 2, 3]  # whole pages, cheapest (earliest) first
    assert seg(t.match(list(range(10)))) == [(0, 4, None), (4, 10, [4, 5, 6, 7, 8, 9])]
    t.check_integrity()


def test_hole_without_cached_descendant_is_removed():
    t = HoleTree()
    t.insert([1, 2, 3, 4], [0, 1, 2, 3])
    t.evict_span([1, 2, 3, 4], 2, 4)
    assert [n.key for n in t.nodes()] == [(1, 2)]  # the hole leaf [3, 4] is gone
    t.evict_span([1, 2], 0, 2)
    assert t.nodes() == []
    t.check_integrity()


def test_page_size_partial_page_is_rejected():
    t = HoleTree(page_size=4)
    out = t.insert(list(range(10)), list(range(10)))
    assert out.rejected_slots.tolist() == [8, 9] and t.total_size == 8
    r = t.match(list(range(10)))
    assert seg(r) == [(0, 8, list(range(8))), (8, 10, None)]
    assert seg(t.match([0, 1, 2, 3, 4, 5, 9, 9])) == [(0, 4, [0, 1, 2, 3]), (4, 8, None)]  # page compare
    t.check_integrity()


def test_bad_input_leaves_tree_unchanged():
    t = HoleTree(page_size=2)
    t.insert([1, 2, 3, 4], [0, 1, 2, 3])
    h = t.match([1, 2, 3, 4]).handle
    before = snapshot(t)
    with pytest.raises(ValueError, match="3 slots for 4 tokens"):
        t.insert([1, 2, 3, 5], [7, 8, 9])
    with pytest.raises(TypeError, match="tokens must be ints"):
        t.insert([1, 2, 3.0, 5], [7, 8, 9, 10])
    with pytest.raises(TypeError, match="tokens must be ints"):
        t.match(["a", "b"])
    with pytest.raises(TypeError, match="integer tensor"):
        t.insert([1, 2, 3, 5], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="not locked"):
        t.unlock(h)
    t.lock(h)
    t.unlock(h)
    with pytest.raises(ValueError, match="unlocked twice"):
        t.unlock(h)
    with pytest.raises(ValueError, match="cannot evict 5 tokens: only 4"):
        t.evict(5)
    for span, msg in (((2, 2), "empty, reversed"), ((3, 1), "empty, reversed"), ((0, 6), "outside"),
                      ((1, 3), "not aligned"), ((-2, 2), "outside")):
        with pytest.raises(ValueError, match=msg):
            t.evict_span([1, 2, 3, 4], *span)
    with pytest.raises(ValueError, match="not in the cache"):
        t.evict_span([1, 2, 9, 9], 0, 4)
    t.lock(h)
    with pytest.raises(ValueError, match="locked"):
        t.evict_span([1, 2, 3, 4], 2, 4)
    t.unlock(h)
    assert snapshot(t) == before
    t.check_integrity()
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("tlru")
    with pytest.raises(TypeError, match="EvictionPolicy"):
        HoleTree(policy="cost-aware")
    with pytest.raises(ValueError, match="page_size"):
        HoleTree(page_size=0)


def test_check_integrity_catches_corruption():
    t = HoleTree()
    t.insert([1, 2, 3], [0, 1, 2])
    t.insert([1, 2, 4], [0, 1, 0])  # a caller bug: slot 0 handed over again for a new position
    with pytest.raises(AssertionError, match="owned twice"):
        t.check_integrity()
    t2 = HoleTree()
    t2.insert([1, 2], [0, 1])
    t2.evictable_size += 1
    with pytest.raises(AssertionError, match="size accounting"):
        t2.check_integrity()


def test_recompute_cost_formula():
    c = RecomputeCost(linear_flops_per_token=10.0, attention_flops_per_key=1.0)
    assert c.span(0, 3) == 10 * 3 + (1 + 2 + 3)
    assert c.span(5, 5) == 0.0
    assert 13e9 < LLAMA3_8B.linear_flops_per_token < 15e9
    assert LLAMA3_8B.attention_flops_per_key == 4 * 32 * 128 * 32
    with pytest.raises(ValueError, match="intermediate_size"):
        RecomputeCost.from_config({"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1})


def test_prefix_node_ends_the_leading_cached_run():
    t = HoleTree()
    t.insert(list(range(10)), list(range(10)))
    assert t.match(list(range(10))).prefix_node.end == 10
    t.evict_span(list(range(10)), 4, 6)
    r = t.match(list(range(10)))
    assert r.prefix_node.end == 4 and r.cached_prefix_len == 4 and r.handle.node.end == 10
    t.evict_span(list(range(10)), 0, 2)
    assert t.match(list(range(10))).prefix_node is t.root


def test_eviction_policies_do_not_reach_back_into_the_tree():
    """Layering: the tree imports its policies, never the reverse (no cycle, no TYPE_CHECKING back-reference)."""
    import pathlib

    import sglang_holes.cache.eviction as eviction

    source = pathlib.Path(eviction.__file__).read_text()
    assert "cache.tree" not in source and "TYPE_CHECKING" not in source and "._" not in source.replace("self._", "")


def test_insert_with_host_ownership_equals_identity_insert():
    """``owned`` (which given slots are the caller's, known on the host) decides exactly what the
    slot-id comparison decides, without comparing slot ids (a device sync on a GPU)."""
    import random

    rng = random.Random(3)
    for _ in range(50):
        a, b = HoleTree(), HoleTree()
        toks = [rng.randrange(5) for _ in range(30)]
        first = torch.arange(100, 130)
        s, e = sorted(rng.sample(range(20), 2))
        for t in (a, b):
            t.insert(toks[:20], first[:20])
            t.evict_span(toks, s, e)
        # A request reused what is still cached (the tree's slots) and computed the rest (its own).
        cached = torch.zeros(30, dtype=torch.bool)
        for g in a.match(toks).segments:
            if g.slots is not None:
                cached[g.start : g.end] = True
        mine = torch.arange(500, 530)
        row = torch.where(cached, first, mine)
        own = ~cached
        if rng.random() < 0.5:  # and computed some cached positions again (duplicates: rejected)
            own[: rng.randrange(30)] = True
            row = torch.where(own, mine, first)
        ra, rb = a.insert(toks, row), b.insert(toks, row, owned=own)
        assert ra.rejected_slots.tolist() == rb.rejected_slots.tolist()
        assert snapshot(a) == snapshot(b)
        a.check_integrity()
        b.check_integrity()
    with pytest.raises(ValueError, match="does not own"):
        HoleTree().insert([1, 2], [5, 6], owned=torch.tensor([True, False]))


def test_cost_aware_crf_is_the_decayed_hit_count():
    """``log_crf`` kept by ``CostAware.hit`` is log Σ exp(tᵢ / decay) over the node's hits: at any tick its
    ``crf`` equals the hits decayed by their age, computed directly."""
    policy = make_policy("cost-aware", SMOLLM2_135M, decay=8)
    t = HoleTree(policy=policy)
    t.insert([1, 2, 3], [0, 1, 2])  # tick 1: created, one hit
    ticks = [1]
    for k in range(12):
        if k % 3 == 0:
            t.match([1, 2, 3])
            ticks.append(t.now)
        else:
            t.match([9])  # the clock moves on
    node = t.root.children[(1,)]
    want = sum(math.exp(-(t.now - s) / 8) for s in ticks)
    assert policy.crf(node, t.now) == pytest.approx(want, rel=1e-12)
