"""The `holes` radix cache backend in the real SGLang engine (CPU, embedded SmolLM2).

With no holes it must behave exactly like stock SGLang. Under memory pressure,
cost-aware eviction punches interior holes; a later request then reuses the KV after
the holes and recomputes only the holes and the tail, in one extend pass at original
positions. Every output must equal a cold run, with every slot accounted for.
"""

from __future__ import annotations

import random

import pytest

pytestmark = pytest.mark.engine

SAMPLING = {"max_new_tokens": 4, "temperature": 0.0}
# fp32 end to end: reusing KV computed in other passes (other batch shapes) and the
# O(m·n) hole attention differ from a cold O(n²) prefill only by float32 rounding,
# ~1e-6 on logprobs after 30 layers; 1e-4 leaves headroom without hiding a wrong key
# or position (which moves logprobs by O(0.1)).
LOGPROB_TOL = 1e-4


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
        n, cached = b["meta_info"]["prompt_tokens"], b["meta_info"]["cached_tokens"]
        assert b["meta_info"]["recomputed_tokens"] == n - cached, p
        assert b["meta_info"]["hole_spans"] == [[cached, n]], p
    assert _cache(holes_engine)["integrity"] == "ok"


def test_memory_pressure_soak_matches_cold_runs(engine, holes_engine):
    """~1,030-token prompts over 5 documents through a 3,400-token pool with cost-aware eviction: interior
    holes are punched and refilled; every output equals a cold run and no slot leaks."""
    docs = _docs(2, 5, 80)
    holes_engine.flush_cache()
    reused = 0
    before = _cache(holes_engine)["stats"]
    # ~1,030-token documents, 3.3 fit: document 0 stays hot while the others churn, so
    # cost-aware eviction eats the cheap heads of idle documents and document 1 comes
    # back with a hole at its start and its tail still cached.
    order = [0, 1, 2, 0, 3, 0, 1, 4, 0, 2]
    for k, d in enumerate(order):
        prompt = docs[d] + f" Question {k % 3}: which item costs most?"
        got = holes_engine.generate(prompt=prompt, sampling_params=SAMPLING, return_logprob=True,
                                    top_logprobs_num=5)
        engine.flush_cache()
        cold = engine.generate(prompt=prompt, sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5)
        assert got["output_ids"] == cold["output_ids"], (k, got["text"], cold["text"])
        for a, b in zip(got["meta_info"]["output_top_logprobs"], cold["meta_info"]["output_top_logprobs"],
                        strict=True):
            assert [t[1] for t in a] == [t[1] for t in b]  # same top-5 tokens
            assert max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True)) <= LOGPROB_TOL
        reused += got["meta_info"]["cached_tokens"]
        c = _cache(holes_engine)
        assert c["integrity"] == "ok", c
        assert c["available"] + c["evictable"] + c["protected"] == c["pool_size"], c
        assert c["protected"] == 0, c  # nothing stays locked after a request
    assert reused > 0  # the cache was actually used between evictions
    stats = _cache(holes_engine)["stats"]
    assert stats["hole_requests"] > before["hole_requests"]  # KV after a hole was reused
    assert stats["fallbacks"] == before["fallbacks"]
    assert holes_engine.flush_cache().success
    c = _cache(holes_engine)
    assert (c["available"], c["evictable"], c["protected"]) == (c["pool_size"], 0, 0), c


def _compare(got: dict, cold: dict) -> None:
    assert got["output_ids"] == cold["output_ids"], (got["text"], cold["text"])
    for a, b in zip(got["meta_info"]["output_top_logprobs"], cold["meta_info"]["output_top_logprobs"], strict=True):
        assert [t[1] for t in a] == [t[1] for t in b]
        assert max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True)) <= LOGPROB_TOL


def _cold(engine, ids) -> dict:
    engine.flush_cache()
    return engine.generate(input_ids=ids, sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5)


def _ids(tokenizer, n: int, seed: int) -> list[int]:
    text = " ".join(_docs(seed, 12, 40))
    ids = tokenizer(text)["input_ids"]
    assert len(ids) >= n
    return ids[:n]


def _cover(spans: list[tuple[int, int]], n: int) -> list[list[int]]:
    """Spans a request recomputes: the holes inside [0, n-1) and the last token (always), merged."""
    from sglang_holes.attention.plan import spans_from_positions

    pos = {p for s, e in spans for p in range(s, min(e, n - 1))} | {n - 1}
    return [list(span) for span in spans_from_positions(sorted(pos))]


@pytest.mark.parametrize(
    "n, spans",
    [
        (300, [(0, 17)]),
        (1000, [(120, 160), (700, 702)]),
        (1500, [(0, 3), (50, 51), (200, 300), (640, 700), (900, 1000), (1200, 1201), (1300, 1350), (1490, 1500)]),
    ],
    ids=["1 hole at 0", "2 holes", "8 holes, at 0 and touching the end"],
)
def test_evicted_spans_are_recomputed_exactly(engine, holes_engine, tokenizer, n, spans):
    ids = _ids(tokenizer, n, seed=n)
    holes_engine.flush_cache()
    holes_engine.generate(input_ids=ids, sampling_params=SAMPLING)  # cache the prompt
    for s, e in spans:
        assert holes_engine.evict_span(ids, s, e) == e - s
    assert _cache(holes_engine)["integrity"] == "ok"
    before = _cache(holes_engine)["stats"]
    got = holes_engine.generate(input_ids=ids, sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5)
    after = _cache(holes_engine)["stats"]
    _compare(got, _cold(engine, ids))
    hole_spans = _cover(spans, n)
    recomputed = sum(e - s for s, e in hole_spans)
    assert got["meta_info"]["hole_spans"] == hole_spans
    assert got["meta_info"]["recomputed_tokens"] == recomputed
    assert after["hole_requests"] == before["hole_requests"] + 1
    assert after["recomputed_tokens"] - before["recomputed_tokens"] == recomputed
    assert got["meta_info"]["cached_tokens"] == n - recomputed
    c = _cache(holes_engine)
    assert c["integrity"] == "ok" and c["protected"] == 0, c
    assert c["available"] + c["evictable"] == c["pool_size"], c


def test_mixed_batch_and_shared_holes(engine, holes_engine, tokenizer):
    """One batch: a hole request twice (the same hole computed by two requests at once),
    a new prompt, and a prompt that shares a cached prefix."""
    a = _ids(tokenizer, 500, seed=7)
    c = _ids(tokenizer, 400, seed=8)
    holes_engine.flush_cache()
    holes_engine.generate(input_ids=a, sampling_params=SAMPLING)
    holes_engine.generate(input_ids=c, sampling_params=SAMPLING)
    holes_engine.evict_span(a, 100, 180)
    b = _ids(tokenizer, 350, seed=9)
    c2 = c[:300] + b[:50]
    batch = [a, a, b, c2]
    got = holes_engine.generate(input_ids=batch, sampling_params=SAMPLING, return_logprob=True,
                                top_logprobs_num=5)
    for ids, g in zip(batch, got, strict=True):
        _compare(g, _cold(engine, ids))
    st = _cache(holes_engine)
    assert st["integrity"] == "ok" and st["protected"] == 0
    assert st["available"] + st["evictable"] == st["pool_size"]
    assert holes_engine.flush_cache().success
    st = _cache(holes_engine)
    assert st["available"] == st["pool_size"]


def test_evict_span_bad_input(holes_engine, tokenizer):
    ids = _ids(tokenizer, 120, seed=11)
    holes_engine.flush_cache()
    holes_engine.generate(input_ids=ids, sampling_params=SAMPLING)
    before = _cache(holes_engine)
    for args, msg in [((ids, 5, 5), "empty, reversed"), ((ids, 10, 5), "empty, reversed"),
                      ((ids, 0, 500), "outside"), ((ids, -1, 3), "outside"),
                      (([*ids[:50], 7, 7, 7], 0, 53), "not in the cache")]:
        with pytest.raises(ValueError, match=msg):
            holes_engine.evict_span(*args)
    after = _cache(holes_engine)
    assert (after["available"], after["evictable"], after["integrity"]) == \
        (before["available"], before["evictable"], "ok")
    out = holes_engine.generate(input_ids=ids, sampling_params=SAMPLING)  # still serving
    assert out["meta_info"]["cached_tokens"] == len(ids) - 1


def test_evict_span_in_a_salted_namespace(engine, holes_engine, tokenizer):
    """A prompt cached under a cache salt is evicted in that namespace only (Engine and HTTP
    take ``cache_salt`` / ``extra_key``); its namespace's tree goes when nothing is left."""
    ids = _ids(tokenizer, 400, seed=77)
    holes_engine.flush_cache()
    holes_engine.generate(input_ids=ids, sampling_params=SAMPLING, cache_salt="tenant-x")
    with pytest.raises(ValueError, match="not in the cache"):
        holes_engine.evict_span(ids, 10, 20)  # the default namespace does not hold it
    assert holes_engine.evict_span(ids, 10, 20, cache_salt="tenant-x") == 10
    got = holes_engine.generate(input_ids=ids, sampling_params=SAMPLING, cache_salt="tenant-x",
                                return_logprob=True, top_logprobs_num=5)
    _compare(got, _cold(engine, ids))
    assert got["meta_info"]["hole_spans"] == [[10, 20], [399, 400]]
    with pytest.raises(ValueError, match="cache_salt must be a string"):
        holes_engine.evict_span(ids, 10, 20, cache_salt=7)
    assert holes_engine.flush_cache().success
    assert _cache(holes_engine)["integrity"] == "ok"
