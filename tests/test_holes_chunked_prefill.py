"""SGLang's chunked prefill (64- and 256-token pieces) over requests with holes and RAG chunks, in the real engine.

Split from ``tests/test_holes_soak.py`` (same tiny model, same checks after every step): only the
missing tokens are split into pieces, admission counts only them, chunks computed in one piece are
stored as the pieces complete, and every answer equals a cold run.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from sglang_holes.config import SINK_TOKENS
from tests.test_holes_soak import LOGPROB_TOL, SAMPLING, _cache, _check_pool, _compare

pytestmark = pytest.mark.engine


CHUNKED_POOL = 4000


@pytest.fixture(scope="module", params=[64, 256], ids=lambda c: f"chunk{c}")
def chunked(request, engines, tiny_llama: Path) -> Iterator[object]:
    """The tiny model with SGLang's chunked prefill at 64 and at 256 tokens."""
    with engines.scoped(model_path=str(tiny_llama), skip_tokenizer_init=True, log_level="error", random_seed=0,
                        radix_cache_backend="holes", max_total_tokens=CHUNKED_POOL,
                        chunked_prefill_size=request.param) as eng:
        yield eng


def _holes(n: int, k: int, rng: random.Random) -> list[tuple[int, int]]:
    """``k`` disjoint spans of ``[0, n - 1)``: the first at position 0, the last ending at ``n - 1``
    (the prompt's last token is never cached), the others spread between."""
    if k == 1:
        return [(n // 3, n // 3 + 40)]
    cuts = sorted(rng.sample(range(20, n - 60, 1), k - 2))
    spans = [(0, 7)] + [(c, c + rng.randint(1, 30)) for c in cuts] + [(n - 40, n - 1)]
    out: list[tuple[int, int]] = []
    for s0, e0 in spans:  # merge overlaps
        if out and s0 <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e0))
        else:
            out.append((s0, e0))
    return out


@pytest.mark.parametrize("n, k", [(1200, 1), (2000, 4), (3000, 16)])
def test_chunked_prefill_over_holes_recomputes_only_the_holes(chunked, tiny_engines, n, k):
    """SGLang chunks the MISSING tokens (holes + tail), in position order, into pieces of at most
    its chunk budget; each piece attends to reused spans and earlier pieces. Output equals a cold
    run; exactly the holes and the tail are recomputed; no fallback; every slot accounted for."""
    _, cold = tiny_engines
    rng = random.Random(n + k)
    ids = [rng.randrange(3, 2000) for _ in range(n)]
    assert chunked.flush_cache().success
    chunked.generate(input_ids=ids, sampling_params=SAMPLING)
    holes = _holes(n, k, rng)
    for s0, e0 in holes:
        chunked.evict_span(ids, s0, e0)
    before = _cache(chunked)["stats"]
    kw = dict(input_ids=ids, sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5)
    got = chunked.generate(**kw)
    _compare(got, cold.generate(**kw), (n, k))
    expected = [list(h) for h in holes]
    if expected[-1][1] == n - 1:
        expected[-1][1] = n  # the last hole runs into the (always recomputed) last token
    else:
        expected.append([n - 1, n])
    meta = got["meta_info"]
    assert meta["hole_spans"] == expected
    assert meta["recomputed_tokens"] == sum(e0 - s0 for s0, e0 in expected)
    after = _cache(chunked)["stats"]
    assert after["fallbacks"] == before["fallbacks"]
    assert after["hole_requests"] == before["hole_requests"] + 1
    assert after["recomputed_tokens"] - before["recomputed_tokens"] == meta["recomputed_tokens"]
    assert after["reused_tokens"] - before["reused_tokens"] == meta["cached_tokens"]
    _check_pool(chunked)
    assert chunked.flush_cache().success
    assert _check_pool(chunked)["available"] == CHUNKED_POOL


def test_admission_counts_only_the_recomputed_tokens(chunked, tiny_engines):
    """A pool where ``n - P0`` (what stock admission would budget) does not fit next to the cached
    prompt, but the holes do: the request runs as a hole request, exact."""
    _, cold = tiny_engines
    rng = random.Random(3)
    n = CHUNKED_POOL - 400
    ids = [rng.randrange(3, 2000) for _ in range(n)]
    assert chunked.flush_cache().success
    chunked.generate(input_ids=ids, sampling_params=SAMPLING)
    chunked.evict_span(ids, 10, 30)
    c = _check_pool(chunked)
    assert n - 10 > c["available"] + c["evictable"] - (n - 20)  # stock budget vs what is left once pinned
    before = c["stats"]
    kw = dict(input_ids=ids, sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5)
    got = chunked.generate(**kw)
    _compare(got, cold.generate(**kw), "admission")
    assert got["meta_info"]["hole_spans"] == [[10, 30], [n - 1, n]]
    after = _cache(chunked)["stats"]
    assert (after["hole_requests"], after["fallbacks"]) == (before["hole_requests"] + 1, before["fallbacks"])
    _check_pool(chunked)


def _separated(docs: list[list[int]], q: list[int], sep: int, policy: str, **params) -> tuple[list[int], dict]:
    """``docs`` as chunks with one computed separator token after each, then the question (a chunk)."""
    from sglang_holes.chunks.hints import chunk_envelope

    ids, spans = [], []
    for d in [*docs, q]:
        spans.append((len(ids), len(ids) + len(d)))
        ids += d if d is q else [*d, sep]
    return ids, chunk_envelope(spans, policy, **params)


def test_chunk_requests_under_chunked_prefill(chunked, tiny_engines):
    """SGLang prefills a chunk request in pieces (64 or 256 tokens): chunks it computes are stored as
    the pieces complete; a later request reuses them, SGLang chunking only what it copies or
    computes. In place (same order) the output equals the cold run; moved, it equals the same
    request on an engine that prefills it in one piece. Nothing leaks."""
    holes, cold = tiny_engines
    rng = random.Random(5)
    docs = [[rng.randrange(3, 2000) for _ in range(rng.randint(40, 60))] for _ in range(6)]
    q = [rng.randrange(3, 2000) for _ in range(8)]
    kw = dict(sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5)
    assert chunked.flush_cache().success and holes.flush_cache().success
    ids, hints = _separated(docs, q, 7, "first_k", k=10_000)
    ref = cold.generate(input_ids=ids, **kw)
    for eng in (chunked, holes):
        _compare(eng.generate(input_ids=ids, kv_hints=hints, **kw), ref, "computes all")
    assert _check_pool(chunked)["chunks"]["entries"] == 7
    got = chunked.generate(input_ids=ids, kv_hints=_separated(docs, q, 7, "none")[1], **kw)
    n, seps = len(ids), [e for s, e in hints["actions"][0]["payload"]["chunks"][:-1]]
    assert got["meta_info"]["chunk_reuse"]["reused_tokens"] == n - len(seps) - 1
    assert got["meta_info"]["hole_spans"] == [[p, p + 1] for p in seps] + [[n - 1, n]]
    _compare(got, ref, "in place, chunked")
    moved_docs = [docs[i] for i in (3, 1, 5, 0, 4, 2)]
    for policy, params in (("none", {}), ("first_k", {"k": 4}), ("deviation", {"ratio": 0.2})):
        moved, moved_hints = _separated(moved_docs, q, 7, policy, **params)
        outs = [eng.generate(input_ids=moved, kv_hints=moved_hints, **kw) for eng in (chunked, holes)]
        metas = [o["meta_info"] for o in outs]
        assert metas[0]["chunk_reuse"] == metas[1]["chunk_reuse"] and metas[0]["chunk_reuse"]["reused_chunks"] == 7
        for key in ("hole_spans", "cached_tokens"):
            assert metas[0][key] == metas[1][key], (policy, key)
        _compare(outs[0], outs[1], f"moved, {policy}, chunked vs one piece")
        _check_pool(chunked)
    assert chunked.flush_cache().success
    assert _check_pool(chunked)["available"] == CHUNKED_POOL


def test_an_extend_of_copies_only_computes_its_last_position(chunked, tiny_engines):
    """A moved chunk longer than SGLang's piece: a piece with nothing to compute would have no
    logits to read, so it computes its last position instead of copying it (chunked prefill only)."""
    rng = random.Random(6)
    docs = [[rng.randrange(3, 2000) for _ in range(300)] for _ in range(2)]
    q = [rng.randrange(3, 2000) for _ in range(5)]
    assert chunked.flush_cache().success
    ids, hints = _separated(docs, q, 7, "none")
    chunked.generate(input_ids=ids, kv_hints=hints, sampling_params=SAMPLING)
    moved, moved_hints = _separated(docs[::-1], q, 7, "none")
    meta = chunked.generate(input_ids=moved, kv_hints=moved_hints, sampling_params=SAMPLING)["meta_info"]
    n, size = len(moved), chunked.get_server_info()["chunked_prefill_size"]
    computed = [p for s, e in meta["hole_spans"] for p in range(s, e)]
    # SGLang chunks the order (copied and computed positions; q sits where it was stored: read in
    # place) into pieces of `size`; a piece without the attention sink, a separator or the last
    # token computes its last.
    order, natural = [*range(602), n - 1], {*range(SINK_TOKENS), 300, 601, n - 1}
    pieces = [order[a : a + size] for a in range(0, len(order), size)]
    assert computed == sorted(natural | {p[-1] for p in pieces if not natural & set(p)})
    assert meta["cached_tokens"] + meta["recomputed_tokens"] == meta["prompt_tokens"] == n
    assert meta["chunk_reuse"]["reused_tokens"] == meta["cached_tokens"] == n - len(computed)
    _check_pool(chunked)


def test_input_logprobs_of_a_chunk_request_across_pieces(chunked, tiny_engines):
    """Input logprobs from ``logprob_start_len`` on, over a tail longer than SGLang's piece: those
    positions are computed (in several pieces), each scored against the prompt's next token."""
    cold = tiny_engines[1]
    rng = random.Random(7)
    docs = [[rng.randrange(3, 2000) for _ in range(50)] for _ in range(4)]
    tail = [rng.randrange(3, 2000) for _ in range(150)]
    assert chunked.flush_cache().success
    ids, hints = _separated(docs, tail, 7, "none")
    chunked.generate(input_ids=ids, kv_hints=hints, sampling_params=SAMPLING)
    start = len(ids) - 140
    kw = dict(input_ids=ids, sampling_params={"max_new_tokens": 1, "temperature": 0.0}, return_logprob=True,
              logprob_start_len=start, top_logprobs_num=3)
    got, ref = chunked.generate(kv_hints=hints, **kw), cold.generate(**kw)
    meta = got["meta_info"]
    assert meta["cached_tokens"] == start - len(docs), meta  # in place up to the logprob tail, separators computed
    got_lp, ref_lp = meta["input_token_logprobs"], ref["meta_info"]["input_token_logprobs"]
    assert len(got_lp) == len(ref_lp) == 140
    assert [x[1] for x in got_lp] == [x[1] for x in ref_lp]
    assert max(abs(a[0] - b[0]) for a, b in zip(got_lp[1:], ref_lp[1:], strict=True)) <= LOGPROB_TOL
    _check_pool(chunked)


def test_chunks_stored_after_a_piece_stay_the_stores(chunked, tiny_engines):
    """Issue 19's one-client reproduction. ``[sys, d6, d3]``, then ``[sys, d6, d0, d1, d2]``: d6 is read
    in place, d0-d2 are new and prefilled over several pieces. The checkpoint after each piece hands
    the finished documents to the chunk store; the next piece's commit used to forget that, so the
    release freed slots the store still owned (on main: pool not whole after a flush, "a slot is owned
    twice" once they were handed out again). Now the ledger keeps handed spans until release."""
    cold = tiny_engines[1]
    rng = random.Random(19)
    system = [rng.randrange(3, 2000) for _ in range(24)]
    docs = [[rng.randrange(3, 2000) for _ in range(90)] for _ in range(7)]
    kw = dict(sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5)

    def request(picked: list[int], question: list[int]) -> tuple[list[int], dict]:
        from sglang_holes.chunks.hints import chunk_envelope

        ids, spans = list(system), []
        for d in picked:
            spans.append((len(ids), len(ids) + len(docs[d])))
            ids += docs[d]
        return ids + question, chunk_envelope(spans, "none")

    assert chunked.flush_cache().success
    for picked, question in (([6, 3], [5, 6, 7]), ([6, 0, 1, 2], [8, 9, 10, 11])):
        ids, hints = request(picked, question)
        got = chunked.generate(input_ids=ids, kv_hints=hints, **kw)
        _compare(got, cold.generate(input_ids=ids, **kw), picked)  # every reused document sits in place
        _check_pool(chunked)
    assert got["meta_info"]["chunk_reuse"]["reused_chunks"] == 1
    assert _check_pool(chunked)["chunks"]["entries"] == 5
    assert chunked.flush_cache().success
    assert _check_pool(chunked)["available"] == CHUNKED_POOL


def test_the_simulator_predicts_the_engine_under_chunked_prefill(chunked, tiny_llama):
    """Issue 22 item 1 with prefill pieces: ``policy_replay.replay(..., chunk=)`` allocates, evicts and
    checkpoints per piece as SGLang does, and predicts every request's computed tokens exactly
    (``cost-aware``, prompts of 4-9 pieces at 64 tokens, 1-4 at 256, in a pool that evicts)."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from policy_replay import replay

    from sglang_holes.cache.recompute_cost import RecomputeCost
    from tests.test_policies_engine import _sessions

    assert chunked.flush_cache().success
    requests = _sessions(seed=7, doc=1000)
    got = [chunked.generate(input_ids=ids, sampling_params={"max_new_tokens": 1})["meta_info"] for ids in requests]
    chunk = chunked.server_args.chunked_prefill_size
    cost = RecomputeCost.from_config(json.loads((tiny_llama / "config.json").read_text()))
    want = replay("cost-aware", requests, CHUNKED_POOL, cost, chunk=chunk)
    assert [m["prompt_tokens"] - m["cached_tokens"] for m in got] == [o.computed for o in want]
    assert sum(o.holes for o in want) > 0  # the stream makes holes: pieces of fills are replayed too
