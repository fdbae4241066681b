"""The `holes` radix cache backend in the real SGLang engine (CPU, embedded SmolLM2).

At this stage SGLang is shown the leading cached run of a prompt (as stock SGLang), so
with no holes it must behave exactly like stock, and under memory pressure — where
cost-aware eviction punches interior holes and checkpoints refill them — outputs must
equal cold runs with every slot accounted for.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

SAMPLING = {"max_new_tokens": 4, "temperature": 0.0}


def _holes_engine(model: Path, policy: str, max_total_tokens: int):
    import sglang_holes

    old = os.environ.get("SGLANG_HOLES_EVICTION_POLICY")
    os.environ["SGLANG_HOLES_EVICTION_POLICY"] = policy  # read by the scheduler process at start
    try:
        return sglang_holes.Engine(model_path=str(model), log_level="error", radix_cache_backend="holes",
                                   max_total_tokens=max_total_tokens, random_seed=0)
    finally:
        if old is None:
            del os.environ["SGLANG_HOLES_EVICTION_POLICY"]
        else:
            os.environ["SGLANG_HOLES_EVICTION_POLICY"] = old


@pytest.fixture(scope="module")
def holes_engine(embedded_model: Path) -> Iterator[object]:
    eng = _holes_engine(embedded_model, "cost-aware", max_total_tokens=800)
    try:
        yield eng
    finally:
        eng.shutdown()


def _cache(eng) -> dict:
    return eng.get_server_info()["internal_states"][0]["sglang_holes"]["cache"]


def _docs(seed: int, n: int, facts: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Document {i}: " + " ".join(f"item {i}-{j} costs {rng.randint(1, 999)} euros." for j in range(facts))
            for i in range(n)]


def test_no_holes_behaves_exactly_like_stock(engine, holes_engine):
    """Same requests, no eviction: identical output ids and cached_tokens."""
    docs = _docs(1, 3, 12)
    prompts = [docs[0] + " Q1?", docs[0] + " Q2?", docs[1] + " Q3?", docs[0] + " Q1?", docs[2], docs[1] + " Q4?"]
    engine.flush_cache()
    holes_engine.flush_cache()
    for p in prompts:
        a = engine.generate(prompt=p, sampling_params=SAMPLING)
        b = holes_engine.generate(prompt=p, sampling_params=SAMPLING)
        assert b["output_ids"] == a["output_ids"], p
        assert b["meta_info"]["cached_tokens"] == a["meta_info"]["cached_tokens"], p
    assert _cache(holes_engine)["integrity"] == "ok"


def test_memory_pressure_soak_matches_cold_runs(engine, holes_engine):
    """~270-token prompts through an 800-token pool with cost-aware eviction: interior
    holes are punched and refilled; every output equals a cold run and no slot leaks."""
    docs = _docs(2, 5, 25)
    rng = random.Random(3)
    holes_engine.flush_cache()
    reused = 0
    for k in range(16):
        prompt = rng.choice(docs) + f" Question {k % 4}: which item costs most?"
        got = holes_engine.generate(prompt=prompt, sampling_params=SAMPLING)
        engine.flush_cache()
        cold = engine.generate(prompt=prompt, sampling_params=SAMPLING)
        assert got["output_ids"] == cold["output_ids"], (k, got["text"], cold["text"])
        reused += got["meta_info"]["cached_tokens"]
        c = _cache(holes_engine)
        assert c["integrity"] == "ok", c
        assert c["available"] + c["evictable"] + c["protected"] == c["pool_size"], c
        assert c["protected"] == 0, c  # nothing stays locked after a request
    assert reused > 0  # the cache was actually used between evictions
    assert holes_engine.flush_cache().success
    c = _cache(holes_engine)
    assert (c["available"], c["evictable"], c["protected"]) == (c["pool_size"], 0, 0), c


def test_policy_setting_is_validated():
    from sglang_holes.patches.radix_cache import eviction_policy_from_env

    os.environ["SGLANG_HOLES_EVICTION_POLICY"] = "lfu"
    try:
        with pytest.raises(ValueError, match="not a policy"):
            eviction_policy_from_env()
    finally:
        del os.environ["SGLANG_HOLES_EVICTION_POLICY"]
