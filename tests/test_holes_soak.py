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

import pytest

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
