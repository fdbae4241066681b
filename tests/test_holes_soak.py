"""Soak of the `holes` backend in the real engine: many requests, random evictions, memory pressure.

A small random-weight Llama keeps 200+ requests (each checked against a cold run of a
second engine with no prefix cache at all) within a minute or two on 2 CPU cores.
Checked after every step: outputs equal cold runs (greedy ids, top-5 logprobs within
1e-4), the tree's integrity, and slot conservation (free + evictable + locked = pool);
at the end, ``flush_cache`` gives back every slot (no leak, no double free).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from sglang_holes.config import SINK_TOKENS

pytestmark = pytest.mark.engine

SAMPLING = {"max_new_tokens": 3, "temperature": 0.0}
# fp32 end to end; see tests/test_holes_backend.py for the 1e-4 budget.
LOGPROB_TOL = 1e-4


def _cache(eng) -> dict:
    return eng.get_server_info()["internal_states"][0]["sglang_holes"]["cache"]


def _check_pool(eng, idle: bool = True) -> dict:
    c = _cache(eng)
    assert c["integrity"] == "ok", c
    assert c["available"] + c["evictable"] + c["protected"] == c["pool_size"], c
    if idle:
        assert c["protected"] == 0, c  # nothing stays locked after a request
    return c


def _compare(got: dict, cold: dict, what: object) -> None:
    assert got["output_ids"] == cold["output_ids"], what
    for a, b in zip(got["meta_info"]["output_top_logprobs"], cold["meta_info"]["output_top_logprobs"], strict=True):
        assert [t[1] for t in a] == [t[1] for t in b], what
        assert max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True)) <= LOGPROB_TOL, what
    meta = got["meta_info"]
    assert meta["cached_tokens"] + meta["recomputed_tokens"] == meta["prompt_tokens"], meta


def test_soak_random_evictions_under_memory_pressure(tiny_engines):
    """210 requests (singles and batches of 3) over 12 shared-prefix prompts, random
    evict_span calls in between, a pool that holds ~6 prompts."""
    holes, cold = tiny_engines
    rng = random.Random(1234)
    system = [rng.randrange(3, 2000) for _ in range(40)]
    docs = [[rng.randrange(3, 2000) for _ in range(rng.randrange(200, 400))] for _ in range(6)]
    prompts = [system + docs[d] + [rng.randrange(3, 2000) for _ in range(rng.randrange(5, 20))]
               for d in range(6) for _ in range(2)]
    reference: dict[int, dict] = {}

    def cold_run(i: int) -> dict:
        if i not in reference:
            reference[i] = cold.generate(input_ids=prompts[i], sampling_params=SAMPLING, return_logprob=True,
                                         top_logprobs_num=5)
        return reference[i]

    assert holes.flush_cache().success
    initial = _check_pool(holes)
    assert initial["available"] == initial["pool_size"]
    sent, evictions, refused, hole_reqs0 = 0, 0, 0, _cache(holes)["stats"]["hole_requests"]
    while sent < 210:
        if sent and rng.random() < 0.6:  # punch a random hole into a prompt sent before
            ids = prompts[rng.randrange(len(prompts))]
            s = rng.randrange(len(ids) - 1)
            e = min(len(ids), s + rng.randrange(1, 80))
            try:
                holes.evict_span(ids, s, e)
                evictions += 1
            except ValueError as err:  # that prompt's tail was evicted already: a clean refusal
                assert "not in the cache" in str(err), err
                refused += 1
            _check_pool(holes)
        batch = [rng.randrange(len(prompts)) for _ in range(3 if rng.random() < 0.3 else 1)]
        outs = holes.generate(input_ids=[prompts[i] for i in batch], sampling_params=SAMPLING,
                              return_logprob=True, top_logprobs_num=5)
        for i, out in zip(batch, outs, strict=True):
            _compare(out, cold_run(i), (sent, i))
        sent += len(batch)
        _check_pool(holes)
    stats = _cache(holes)["stats"]
    assert evictions > 50 and stats["hole_requests"] - hole_reqs0 > 20, (evictions, refused, stats)
    assert holes.flush_cache().success
    final = _check_pool(holes)
    assert (final["available"], final["evictable"]) == (initial["pool_size"], 0), final


def test_request_arrives_while_another_holds_its_path_locked(tiny_engines):
    """A refills a hole of a cached prompt and keeps decoding (its path is locked); B, same
    prompt + another question, arrives meanwhile and reuses A's refilled KV; evicting that
    span is refused while A runs, and allowed once A has finished."""
    holes, cold = tiny_engines
    rng = random.Random(99)
    base = [rng.randrange(3, 2000) for _ in range(300)]
    a_ids, b_ids = [*base, 11, 12, 13], [*base, 21, 22]
    assert holes.flush_cache().success
    holes.generate(input_ids=base, sampling_params=SAMPLING)
    assert holes.evict_span(base, 100, 140) == 40

    async def scenario():
        stream = await holes.async_generate(input_ids=a_ids, stream=True, sampling_params={
            "max_new_tokens": 400, "temperature": 0.0, "ignore_eos": True})
        first = await stream.__anext__()  # A is prefilled: hole refilled, path locked, decoding
        loop = asyncio.get_running_loop()
        with pytest.raises(ValueError, match="locked by a running request"):
            await loop.run_in_executor(None, holes.evict_span, base, 100, 140)
        b = await holes.async_generate(input_ids=b_ids, sampling_params=SAMPLING, return_logprob=True,
                                       top_logprobs_num=5)
        last = first
        async for chunk in stream:
            last = chunk
        return first, b, last

    first, b, last = holes.loop.run_until_complete(scenario())
    assert first["meta_info"]["hole_spans"] == [[100, 140], [300, 303]]
    assert last["meta_info"]["finish_reason"] is not None and last["meta_info"]["completion_tokens"] == 400
    assert b["meta_info"]["cached_tokens"] == 300 and b["meta_info"]["hole_spans"] == [[300, 302]]
    _compare(b, cold.generate(input_ids=b_ids, sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5),
             "B")
    _check_pool(holes)
    assert holes.evict_span(base, 100, 140) == 40  # A finished: its lock is gone


def test_uncovered_features_take_the_stock_path_and_are_counted(tiny_engines):
    """Input logprobs over a prompt with holes: the stock path (recompute from the first
    hole), counted as a fallback, with the same output and input logprobs as a cold run.
    (SGLang matches the prefix only up to ``logprob_start_len``: from 200, the match sees
    the hole at 60 and the cached KV after it.)"""
    holes, cold = tiny_engines
    rng = random.Random(7)
    ids = [rng.randrange(3, 2000) for _ in range(250)]
    assert holes.flush_cache().success
    holes.generate(input_ids=ids, sampling_params=SAMPLING)
    holes.evict_span(ids, 60, 90)
    before = _cache(holes)["stats"]
    kw = dict(input_ids=ids, sampling_params=SAMPLING, return_logprob=True, logprob_start_len=200, top_logprobs_num=5)
    got, ref = holes.generate(**kw), cold.generate(**kw)
    after = _cache(holes)["stats"]
    assert after["fallbacks"] == before["fallbacks"] + 1
    assert after["hole_requests"] == before["hole_requests"]
    _compare(got, ref, "input logprobs")
    cached = got["meta_info"]["cached_tokens"]
    assert cached <= 60 and got["meta_info"]["hole_spans"] == [[cached, 250]]  # no reuse past the first hole
    a = [x[0] for x in got["meta_info"]["input_token_logprobs"] if x[0] is not None]
    b = [x[0] for x in ref["meta_info"]["input_token_logprobs"] if x[0] is not None]
    assert len(a) == len(b) >= 49 and max(abs(x - y) for x, y in zip(a, b, strict=True)) <= LOGPROB_TOL
    _check_pool(holes)


CHUNKED_POOL = 4000


@pytest.fixture(scope="module", params=[64, 256], ids=lambda c: f"chunk{c}")
def chunked(request, engines, tiny_llama: Path) -> object:
    """The tiny model with SGLang's chunked prefill at 64 and at 256 tokens."""
    return engines.start(model_path=str(tiny_llama), skip_tokenizer_init=True, log_level="error", random_seed=0,
                         radix_cache_backend="holes", max_total_tokens=CHUNKED_POOL,
                         chunked_prefill_size=request.param)


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


def _chunk_request(rng: random.Random, docs: list[list[int]]) -> tuple[list[int], dict | None, bool]:
    """(input_ids, kv_hints, exact?): a chunk request under a random policy, or an exact one."""
    from sglang_holes.chunks.hints import build_chunked_prompt

    picked = rng.sample(docs, rng.randint(2, 5))
    question = [rng.randrange(3, 2000) for _ in range(rng.randint(5, 15))]
    if rng.random() < 0.35:
        return [t for d in picked for t in d] + question, None, True
    policy, params, exact = rng.choice([("none", {}, False), ("first_k", {"k": rng.randint(0, 20)}, False),
                                        ("first_k", {"k": 10_000}, True),
                                        ("deviation", {"ratio": rng.choice([0.05, 0.2, 0.5])}, False)])
    p = build_chunked_prompt([*picked, question], lambda text: [], policy=policy, **params)
    return p.input_ids, p.kv_hints, exact


def test_soak_mixed_chunk_and_exact_requests(tiny_engines):
    """150 requests, a third exact and the rest chunk-mode under every policy, singles and
    mixed batches, in a pool that holds ~5 prompts (chunks and exact prefixes evict each
    other): exact requests (and chunk requests that recompute everything) equal cold runs,
    no slot leaks, integrity after every step."""
    holes, cold = tiny_engines
    rng = random.Random(4321)
    docs = [[rng.randrange(3, 2000) for _ in range(rng.randint(40, 120))] for _ in range(10)]
    assert holes.flush_cache().success
    initial = _check_pool(holes)
    sent, checked, before = 0, 0, _cache(holes)["stats"]["chunk_requests"]
    evicted0 = _cache(holes)["stats"]["chunk_evicted_tokens"]
    while sent < 150:
        batch = [_chunk_request(rng, docs) for _ in range(3 if rng.random() < 0.3 else 1)]
        outs = holes.generate(input_ids=[b[0] for b in batch], kv_hints=[b[1] for b in batch],
                              sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5)
        for (ids, hints, exact), out in zip(batch, outs, strict=True):
            meta = out["meta_info"]
            assert meta["cached_tokens"] + meta["recomputed_tokens"] == meta["prompt_tokens"], meta
            assert ("chunk_reuse" in meta) == (hints is not None), meta
            if exact:
                _compare(out, cold.generate(input_ids=ids, sampling_params=SAMPLING, return_logprob=True,
                                            top_logprobs_num=5), (sent, hints))
                checked += 1
        sent += len(batch)
        c = _check_pool(holes)
    # chunks and prefixes share the pool: the store had to give slots back
    assert c["stats"]["chunk_evicted_tokens"] > evicted0, c
    assert checked > 30 and _cache(holes)["stats"]["chunk_requests"] - before > 40, (checked, c)
    assert c["chunks"]["entries"] > 0
    assert holes.flush_cache().success
    final = _check_pool(holes)
    assert (final["available"], final["evictable"], final["chunks"]["entries"]) == (initial["pool_size"], 0, 0)


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
