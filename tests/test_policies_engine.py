"""SGLang's own eviction policies with the ``holes`` cache, in the real engine.

A deployment that relies on request priorities keeps them with hole filling:
``--radix-eviction-policy priority`` evicts the KV of low-priority requests first (the order
``tests/test_sglang_policies.py`` proves equal to SGLang's cache), and a request whose cached
prompt lost an interior span still recomputes only that span.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

POOL = 2000
SAMPLING = {"max_new_tokens": 1, "temperature": 0.0}


@pytest.fixture(scope="module")
def priority_engine(engines, tiny_llama: Path) -> Iterator[object]:
    with engines.scoped(model_path=str(tiny_llama), skip_tokenizer_init=True, log_level="error", random_seed=0,
                        radix_cache_backend="holes", radix_eviction_policy="priority", max_total_tokens=POOL) as eng:
        yield eng


def _ask(eng, ids: list[int], priority: int) -> dict:
    return eng.generate(input_ids=ids, sampling_params=SAMPLING, priority=priority)["meta_info"]


def test_priority_keeps_high_priority_kv_and_fills_holes(priority_engine):
    eng = priority_engine
    state = eng.get_server_info()["internal_states"][0]["sglang_holes"]["cache"]
    assert state["policy"] == "priority" and state["hole_batches"] == "on", state
    rng = random.Random(3)
    prompt = lambda: [rng.randrange(3, 2000) for _ in range(500)]  # noqa: E731
    high, low = prompt(), prompt()
    _ask(eng, high, priority=5)  # first in: LRU would evict it first
    _ask(eng, low, priority=0)
    for _ in range(4):  # 2,000 more tokens at priority 1 in a 2,000-token pool: constant eviction
        _ask(eng, prompt(), priority=1)
    assert _ask(eng, high, priority=5)["cached_tokens"] >= 496  # kept: every prompt page but the last token's
    assert _ask(eng, low, priority=0)["cached_tokens"] == 0  # the lowest priority went first
    assert eng.evict_span(high, 100, 180) == 80
    meta = _ask(eng, high, priority=5)
    assert meta["hole_spans"] == [[100, 180], [499, 500]] and meta["cached_tokens"] == 419, meta


def _sessions(seed: int, sessions: int = 4, turns: int = 8, doc: int = 500) -> list[list[int]]:
    """Chat sessions over documents, interleaved at random (bench_policies' stream, scaled to the tiny pool)."""
    rng = random.Random(seed)
    words = lambda n: [rng.randrange(3, 2000) for _ in range(n)]  # noqa: E731
    system = words(100)
    history = {s: system + words(doc) for s in range(sessions)}
    order = [s for s in range(sessions) for _ in range(turns)]
    rng.shuffle(order)
    out = []
    for s in order:
        history[s] = history[s] + words(30)
        out.append(list(history[s]))
        history[s] = history[s] + words(8)
    return out


@pytest.mark.parametrize("which", ["cost-aware", "priority"])
def test_the_simulator_predicts_the_engine_request_by_request(which, tiny_engines, priority_engine, tiny_llama):
    """Issue 22 item 1: ``benchmarks/policy_replay.py`` (a HoleTree doing what SGLang does around one
    request at a time) predicts the prompt tokens the engine computes for every request of a stream
    that evicts all the time, with holes under ``cost-aware``: exactly, not within a tolerance. Under
    ``cost-aware`` the engine's shadow caches (``DecayDuel``, fed by the cache's ``on_release``) also end
    where the replay's do: each finished request observed once, in order, and the same decay followed."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from policy_replay import run

    from sglang_holes.cache.recompute_cost import RecomputeCost
    from tests.conftest import TINY_POOL

    eng, pool = (tiny_engines[0], TINY_POOL) if which == "cost-aware" else (priority_engine, POOL)
    assert eng.flush_cache().success  # a clean tree and clock, as the simulator starts
    requests = _sessions(seed=5)
    cost = RecomputeCost.from_config(json.loads((tiny_llama / "config.json").read_text()))
    before = _stats(eng)["hole_requests"]
    got = [_ask(eng, ids, priority=0) for ids in requests]
    replayed = run(which, requests, pool, cost)
    want = replayed.outcomes
    assert [m["prompt_tokens"] - m["cached_tokens"] for m in got] == [o.computed for o in want]
    holes = _stats(eng)["hole_requests"] - before
    assert holes == sum(o.holes for o in want) and (holes > 0) == (which == "cost-aware")
    state = eng.get_server_info()["internal_states"][0]["sglang_holes"]["cache"]
    duel = replayed.duel
    if which == "cost-aware":
        assert duel is not None and duel.observed == len(requests) and duel.switches >= 1
        assert (state["policy_decay"], state["policy_switches"]) == (duel.policy.decay, duel.switches)
        assert state["policy_shadow_flops"] == {f"{d:g}": s.flops for d, s in zip(duel.policy.decays, duel.shadows,
                                                                                  strict=True)}
    else:
        assert duel is None and "policy_decay" not in state


@pytest.fixture(scope="module")
def lfu_engine(engines, tiny_llama: Path) -> Iterator[object]:
    with engines.scoped(model_path=str(tiny_llama), skip_tokenizer_init=True, log_level="error", random_seed=0,
                        radix_cache_backend="holes", radix_eviction_policy="lfu", max_total_tokens=POOL,
                        chunked_prefill_size=LFU_CHUNK) as eng:
        yield eng


LFU_CHUNK = 128


def test_the_simulator_predicts_lfu_across_prefill_pieces(lfu_engine, tiny_llama):
    """``lfu`` and ``slru`` order leaves by SGLang's hit count, which a checkpoint bumps only on nodes past
    what the same request inserted at its earlier pieces (``req.kv.cache_inserted_len``). With prompts
    prefilled in several pieces the replay must count the same hits, or it keeps a request's first
    piece that the engine evicts (it did: 34/40 requests of policy_streams' chat stream)."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from policy_replay import replay

    from sglang_holes.cache.recompute_cost import RecomputeCost

    eng = lfu_engine
    assert eng.flush_cache().success
    requests = _sessions(seed=5)
    cost = RecomputeCost.from_config(json.loads((tiny_llama / "config.json").read_text()))
    got = [m["prompt_tokens"] - m["cached_tokens"] for m in (_ask(eng, ids, priority=0) for ids in requests)]
    assert max(got) > 2 * LFU_CHUNK  # several pieces per request, with evictions between them
    assert got == [o.computed for o in replay("lfu", requests, POOL, cost, LFU_CHUNK)]


def _stats(eng) -> dict:
    return eng.get_server_info()["internal_states"][0]["sglang_holes"]["cache"]["stats"]

