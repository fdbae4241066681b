"""``switch_confidence``: the engine's decay duel, under that setting, against the replay (issue 22).

In a module of its own: the engines of ``test_policies_engine.py``'s module are down by then.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_policies_engine import _ask, _sessions

pytestmark = pytest.mark.engine


def test_the_engine_follows_a_confident_duel_as_the_replay_does(engines, tiny_llama):
    """``--radix-eviction-policy-config '{"switch_confidence": 2}'`` reaches the engine's duel, which then
    computes and switches request by request as ``policy_replay.run`` of the same policy does."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from policy_replay import run

    from sglang_holes import make_policy
    from sglang_holes.cache.recompute_cost import RecomputeCost
    from tests.conftest import TINY_POOL

    requests = _sessions(seed=9, sessions=6)  # a stream on which it switches once (the default duel: 3 times)
    cost = RecomputeCost.from_config(json.loads((tiny_llama / "config.json").read_text()))
    with engines.scoped(model_path=str(tiny_llama), skip_tokenizer_init=True, log_level="error", random_seed=0,
                        radix_cache_backend="holes", radix_eviction_policy="cost-aware", max_total_tokens=TINY_POOL,
                        radix_eviction_policy_config={"switch_confidence": 2}) as eng:
        got = [_ask(eng, ids, priority=0) for ids in requests]
        state = eng.get_server_info()["internal_states"][0]["sglang_holes"]["cache"]
    replayed = run(make_policy("cost-aware", cost, switch_confidence=2), requests, TINY_POOL, cost)
    assert [m["prompt_tokens"] - m["cached_tokens"] for m in got] == [o.computed for o in replayed.outcomes]
    duel = replayed.duel
    assert state["policy_switch_confidence"] == duel.switch_confidence == 2
    assert (state["policy_decay"], state["policy_switches"]) == (duel.policy.decay, duel.switches)
    assert duel.switches >= 1
    assert state["policy_shadow_flops"] == {f"{d:g}": s.flops for d, s in zip(duel.policy.decays, duel.shadows,
                                                                              strict=True)}
