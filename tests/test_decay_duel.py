"""``DecayDuel``: cost-aware's shadow caches, one per decay, and the lead it gives the real cache.

* A shadow is the replay of its decay alone: its FLOPs equal ``benchmarks/policy_replay.replay`` of a
  ``cost-aware`` with only that decay, request by request.
* The real cache follows the shadow that computed least, and its victim index is rebuilt when it
  switches (``check_integrity`` after every request: a heap entry whose key changed without a rebuild
  fails it).
* On the benchmark's streams the duel ends on frequency for Zipf chat and on recency for agents.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sglang_holes import HoleTree, make_policy
from sglang_holes.cache.decay_duel import DecayDuel, make_duel
from sglang_holes.cache.eviction import DEFAULT_DECAYS, CostAware
from sglang_holes.cache.recompute_cost import SMOLLM2_135M

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_policy_streams import STREAMS, pool_for
from policy_replay import replay, run


@pytest.fixture(scope="module")
def chat() -> list[list[int]]:
    return STREAMS["chat"](60)


@pytest.mark.parametrize("decay", DEFAULT_DECAYS)
def test_a_shadow_computes_what_the_replay_of_its_decay_computes(chat, decay):
    pool = pool_for(chat, 0.25)
    policy = CostAware(SMOLLM2_135M, DEFAULT_DECAYS)
    duel = DecayDuel(policy, pool, forget=1.0)  # no forgetting: the plain sum
    shadow = duel.shadows[DEFAULT_DECAYS.index(decay)]
    alone = replay(CostAware(SMOLLM2_135M, (decay,)), chat, pool, SMOLLM2_135M)
    for prompt, want in zip(chat, alone, strict=True):
        got = shadow.serve(prompt, 1.0)
        assert got == pytest.approx(want.flops, rel=1e-12)
    shadow.tree.check_integrity()
    assert shadow.tree.total_size <= pool


def test_the_cache_follows_the_cheaper_shadow_and_rebuilds_its_index(chat):
    pool = pool_for(chat, 0.25)
    policy = make_policy("cost-aware", SMOLLM2_135M)
    tree = HoleTree(policy=policy)
    duel = make_duel(policy, pool)
    assert duel is not None and policy.lead == 0
    leads, slot = [], 0
    for prompt in chat:
        before = policy.lead
        tree.match(prompt)  # the hits the policy counts
        tree.insert(prompt, list(range(slot, slot + len(prompt))))  # fresh slot ids; the tree's own are kept
        slot += len(prompt)
        if tree.total_size > pool:
            tree.evict(tree.total_size - pool)
        switched = duel.observe(prompt, [tree])
        flops = [s.flops for s in duel.shadows]
        assert switched == (policy.lead != before)
        # The lead changes only to a shadow that computed strictly less, and never stays on a worse one.
        assert flops[policy.lead] == min(flops), (flops, policy.lead)
        tree.check_integrity()
        duel.check_integrity()
        leads.append(policy.lead)
    assert duel.observed == len(chat) and duel.switches >= 1 and set(leads) != {0}


def test_a_lead_change_without_a_rebuild_is_caught():
    policy = make_policy("cost-aware", SMOLLM2_135M)
    tree = HoleTree(policy=policy)
    for i in range(6):  # nodes whose decayed counts under different decays order them differently
        tree.insert([100 + i, *range(200, 200 + 40 * (i + 1))], list(range(1000 * i, 1000 * i + 40 * i + 41)))
        for _ in range(i):
            tree.match([100 + i, 200])
        tree.match([7])
    tree.check_integrity()
    assert policy.follow(3)
    with pytest.raises(AssertionError, match="key changed without an update"):
        tree.check_integrity()
    tree.reindex()
    tree.check_integrity()


@pytest.mark.parametrize(("stream", "decays"), [("chat", (32.0, 128.0)), ("agent", (2.0,))])
def test_the_duel_ends_on_frequency_for_chat_and_recency_for_agents(stream, decays):
    """The default seeds at 25% cache: Zipf chat sessions return (frequency pays), finished agent
    transcripts do not (recency pays): ``benchmarks/results/policy_streams.md``."""
    requests = STREAMS[stream](150)
    replayed = run("cost-aware", requests, pool_for(requests, 0.25), SMOLLM2_135M, 4096)
    assert replayed.duel is not None and replayed.duel.policy.decay in decays


def test_a_fixed_decay_has_no_duel_and_bad_settings_are_refused():
    assert make_duel(make_policy("cost-aware", decay=8), 1000) is None
    assert make_duel(make_policy("lru"), 1000) is None
    assert make_policy("cost-aware").decays == DEFAULT_DECAYS
    policy = make_policy("priority-cost")
    with pytest.raises(ValueError, match="capacity"):
        DecayDuel(policy, 0)
    with pytest.raises(ValueError, match="forget"):
        DecayDuel(policy, 10, forget=0)
    with pytest.raises(ValueError, match="lead 4"):
        policy.follow(4)
