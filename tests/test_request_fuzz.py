"""No request takes the server down (issue 19): bad input gets a 4xx, everything else a 2xx, never a 5xx
or a hang, and the pool stays whole. Against the live server of ``tests/test_load_soak.py`` (live pool
audit on: a request that broke slot ownership would stop it)."""

from __future__ import annotations

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.live_server import VOCAB

pytestmark = pytest.mark.engine

IDS = st.integers(3, 3000)
BAD_IDS = st.sampled_from([-1, VOCAB, VOCAB + 1, 2**40])
SPAN = st.tuples(st.integers(-5, 400), st.integers(-5, 400)).map(list)


def _ids(draw: st.DrawFn) -> list[int]:
    ids = draw(st.lists(IDS, min_size=1, max_size=300))
    if draw(st.booleans()) and draw(st.booleans()):  # one in four: an id outside the vocabulary somewhere
        ids.insert(draw(st.integers(0, len(ids))), draw(BAD_IDS))
    return ids


@st.composite
def chunk_hints(draw: st.DrawFn, n: int) -> dict:
    spans = draw(st.one_of(
        st.lists(SPAN, min_size=1, max_size=4),
        st.integers(1, 4).map(lambda k: [[i * n // (k + 1), (i + 1) * n // (k + 1)] for i in range(k)])))
    payload: dict = {"chunks": spans, "policy": draw(st.sampled_from(
        ["none", "first_k", "deviation", "query", "explicit", "bogus"]))}
    for name, values in (("ratio", st.floats(-0.5, 1.5, allow_nan=False)), ("k", st.integers(-2, 40)),
                         ("layers", st.integers(-1, 1000)), ("recompute", st.lists(SPAN, max_size=3))):
        if draw(st.booleans()):
            payload[name] = draw(values)
    version = draw(st.sampled_from(["1", "1", "1", "9"]))
    return {"protocol_version": "1", "message_id": "", "actions": [
        {"action_id": "chunks", "action_type": "sglang_holes.chunks", "action_version": version, "payload": payload}]}


@st.composite
def generate_body(draw: st.DrawFn) -> dict:
    ids = _ids(draw)
    body: dict = {"input_ids": ids, "sampling_params": {"max_new_tokens": draw(st.integers(0, 3)),
                                                        "temperature": draw(st.sampled_from([0.0, 0.7]))}}
    if draw(st.booleans()):
        body["kv_hints"] = draw(chunk_hints(len(ids)))
    if draw(st.booleans()):
        body["return_logprob"] = True
        body["logprob_start_len"] = draw(st.integers(-1, len(ids) + 2))
        body["top_logprobs_num"] = draw(st.integers(0, 3))
    return body


@st.composite
def evict_body(draw: st.DrawFn) -> dict:
    return {"input_ids": _ids(draw), "start": draw(st.integers(-3, 320)), "end": draw(st.integers(-3, 330))}


@st.composite
def chat_body(draw: st.DrawFn) -> dict:
    words = st.text("abcdefgh ", min_size=1, max_size=60)
    parts = draw(st.lists(words, min_size=1, max_size=4))
    reuse: dict = {"policy": draw(st.sampled_from(["none", "first_k", "query", "deviation", "explicit", "x"]))}
    for name, values in (("ratio", st.floats(-0.5, 1.5, allow_nan=False)), ("k", st.integers(-2, 40)),
                         ("layers", st.integers(-1, 1000)), ("bogus", st.just(1))):
        if draw(st.booleans()):
            reuse[name] = draw(values)
    content = [{"type": "text", "text": p} for p in parts] if draw(st.integers(0, 4)) else 7
    return {"model": "default", "max_tokens": draw(st.integers(1, 3)), "temperature": 0,
            "messages": [{"role": "user", "content": content}], "chunk_reuse": reuse}


REQUESTS = st.one_of(generate_body().map(lambda b: ("/generate", b)), evict_body().map(lambda b: ("/holes/evict", b)),
                     chat_body().map(lambda b: ("/v1/chat/completions", b)))


@settings(max_examples=90, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(request=REQUESTS)
def test_any_request_gets_2xx_or_4xx(rag_server, request):
    route, body = request
    r = rag_server.post(route, body, timeout=120)
    assert r.status_code < 500, (route, body, r.status_code, r.text[:500])
    assert rag_server.alive(), rag_server.tail()


def test_out_of_vocabulary_ids_get_400_everywhere_and_the_server_keeps_serving(rag_server):
    from sglang_holes.chunks.hints import chunk_envelope

    ids = list(range(100, 400))
    sampling = {"max_new_tokens": 2, "temperature": 0}
    first = rag_server.post("/generate", {"input_ids": ids, "sampling_params": sampling})
    assert first.status_code == 200, first.text
    for bad in (VOCAB, VOCAB + 7, -1):
        oov = [*ids[:50], bad, *ids[50:]]
        for body in ({"input_ids": oov, "sampling_params": sampling},
                     {"input_ids": oov, "sampling_params": sampling, "kv_hints": chunk_envelope([(0, 40)], "none")}):
            r = rag_server.post("/generate", body)
            assert r.status_code == 400 and "outside the vocabulary" in r.text, r.text
        r = rag_server.post("/holes/evict", {"input_ids": oov, "start": 0, "end": 10})
        assert r.status_code == 400 and "outside the vocabulary" in r.text, r.text
        r = rag_server.post("/holes/evict", {"input_ids": [*ids, bad], "start": 0, "end": 10})  # after `end` too
        assert r.status_code == 400 and "outside the vocabulary" in r.text, r.text
    r = rag_server.post("/holes/evict", {"input_ids": ids, "start": 250, "end": 301})
    assert r.status_code == 400 and "outside [0, 300)" in r.text, r.text
    r = rag_server.post("/generate", {"input_ids": ids, "sampling_params": sampling,
                                      "kv_hints": chunk_envelope([(0, 40)], "query", layers=5)})
    assert r.status_code == 400 and "at most the model's 4 layers" in r.text, r.text
    again = rag_server.post("/generate", {"input_ids": ids, "sampling_params": sampling})
    assert again.status_code == 200 and again.json()["output_ids"] == first.json()["output_ids"]
    assert again.json()["meta_info"]["cached_tokens"] == 299  # the cache is intact


def test_pool_is_whole_after_the_fuzz(rag_server):
    """Runs after the fuzz (file order): nothing leaked, nothing owned twice."""
    c = rag_server.cache()
    assert c["integrity"] == "ok", c
    rag_server.flush()
    c = rag_server.cache()
    assert (c["available"], c["evictable"], c["protected"]) == (rag_server.pool, 0, 0), c
    r = requests.get(f"{rag_server.base}/health", timeout=10)
    assert r.status_code == 200
