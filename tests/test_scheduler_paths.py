"""SGLang scheduler paths that replace or redo a request's match, in the real engine (tiny Llama):
``SGLANG_RADIX_FORCE_MISS`` (the match is zeroed after ``match_prefix``) and retraction
(``SGLANG_TEST_RETRACT``: SGLang retracts decoding requests every few steps, as it does when
the pool runs out, and prefills them again later)."""

from __future__ import annotations

import random
from contextlib import AbstractContextManager

import pytest

from tests.test_holes_soak import SAMPLING, _cache, _check_pool, _compare

pytestmark = pytest.mark.engine


def _start(engines, tiny_llama, env: dict[str, str]) -> AbstractContextManager[object]:
    """An engine of this test alone, shut down when its block ends."""
    return engines.scoped(env=env, model_path=str(tiny_llama), skip_tokenizer_init=True, log_level="error",
                          random_seed=0, radix_cache_backend="holes", max_total_tokens=4000)


def test_a_forced_miss_never_places_unlocked_spans(engines, tiny_llama, tiny_engines):
    """With every match zeroed by SGLang, a prompt with holes (and a chunk request) recomputes
    everything: exact output, nothing reused, pool and locks whole."""
    from sglang_holes.chunks.hints import build_chunked_prompt

    with _start(engines, tiny_llama, {"SGLANG_RADIX_FORCE_MISS": "1"}) as eng:
        cold = tiny_engines[1]
        ids = [random.Random(31).randrange(3, 2000) for _ in range(300)]
        eng.generate(input_ids=ids, sampling_params=SAMPLING)
        assert eng.evict_span(ids, 100, 140) == 40
        kw = dict(sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5)
        got = eng.generate(input_ids=ids, **kw)
        _compare(got, cold.generate(input_ids=ids, **kw), "forced miss")
        assert got["meta_info"]["cached_tokens"] == 0 and got["meta_info"]["hole_spans"] == [[0, 300]]
        docs = [[random.Random(s).randrange(3, 2000) for _ in range(60)] for s in (1, 2)]
        for order in (docs, docs[::-1]):
            p = build_chunked_prompt(order, lambda text: [], policy="none")
            meta = eng.generate(input_ids=p.input_ids, kv_hints=p.kv_hints, **kw)["meta_info"]
            assert meta["cached_tokens"] == 0 and meta["recomputed_tokens"] == 120, meta
        stats = _check_pool(eng)["stats"]
        assert stats["hole_requests"] == 0 and stats["chunk_reused_tokens"] == 0, stats


def test_retracted_hole_requests_keep_exact_output_and_accounting(engines, tiny_llama, tiny_engines):
    """Hole requests retracted while decoding and prefilled again: outputs equal cold runs, and each
    request's meta_info describes its first prefill (cached + recomputed = prompt, spans inside it)."""
    with _start(engines, tiny_llama, {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "4"}) as eng:
        cold = tiny_engines[1]
        rng = random.Random(32)
        prompts = [[rng.randrange(3, 2000) for _ in range(200)] for _ in range(4)]
        sampling = {"max_new_tokens": 24, "temperature": 0.0, "ignore_eos": True}
        for ids in prompts:
            eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 1})
            eng.evict_span(ids, 50, 80)
        before = _cache(eng)["stats"]
        outs = eng.generate(input_ids=prompts, sampling_params=sampling)
        refs = cold.generate(input_ids=prompts, sampling_params=sampling)
        retracted = 0
        for out, ref in zip(outs, refs, strict=True):
            meta = out["meta_info"]
            assert out["output_ids"] == ref["output_ids"]
            assert meta["cached_tokens"] + meta["recomputed_tokens"] == meta["prompt_tokens"] == 200, meta
            assert all(0 <= s < e <= 200 for s, e in meta["hole_spans"]), meta
            assert meta["hole_spans"] == [[50, 80], [199, 200]], meta
            retracted += meta["num_retractions"]
        assert retracted > 0  # SGLang did retract (and re-prefill) these requests
        after = _check_pool(eng)["stats"]
        # counted once per request, not again for a prefill after a retraction
        assert after["hole_requests"] - before["hole_requests"] == 4, (before, after)
        assert after["reused_tokens"] - before["reused_tokens"] == 4 * 169
