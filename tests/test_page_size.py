"""Page sizes > 1 end to end (tiny Llama, torch_native): holes at page granularity, the virtual
order page-aligned, chunked prefill over holes, outputs equal cold runs."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from tests.test_holes_soak import SAMPLING, _cache, _check_pool, _compare

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module", params=[4, 16], ids=lambda p: f"page{p}")
def paged(request, engines, tiny_llama) -> Iterator[object]:
    with engines.scoped(model_path=str(tiny_llama), skip_tokenizer_init=True, log_level="error", random_seed=0,
                        radix_cache_backend="holes", max_total_tokens=4096, page_size=request.param,
                        chunked_prefill_size=256) as eng:
        yield eng


def _evicted(spans: list[tuple[int, int]], p: int, n: int) -> list[list[int]]:
    """Each span grown to whole pages (within the prompt's whole pages), merged."""
    out: list[list[int]] = []
    for s, e in spans:
        s, e = s // p * p, min(-(-e // p) * p, n // p * p)
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def _recomputed(evicted: list[list[int]], p: int, n: int) -> list[list[int]]:
    """The evicted pages, then the tail from the last whole page before the last token."""
    tail = (n - 1) // p * p
    out = [list(x) for x in evicted]
    if out and out[-1][1] >= tail:
        out[-1][1] = n
    else:
        out.append([tail, n])
    return out


@pytest.mark.parametrize("n, spans", [
    (300, [(0, 3)]),
    (700, [(37, 41), (200, 260), (513, 514)]),
    (1500, [(5, 6), (300, 420), (700, 705), (1000, 1300), (1480, 1490)]),
])
def test_holes_at_page_granularity_equal_cold_runs(paged, tiny_engines, n, spans):
    cold = tiny_engines[1]
    p = paged.get_server_info()["page_size"]
    ids = [random.Random(n).randrange(3, 2000) for _ in range(n)]
    kw = dict(input_ids=ids, sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5)
    assert paged.flush_cache().success
    paged.generate(input_ids=ids, sampling_params=SAMPLING)
    for s, e in ((n - 3, n + 1), (0, 4 * n), (-1, 5)):  # outside the prompt: refused at any page size, not clamped
        with pytest.raises(ValueError, match="outside"):
            paged.evict_span(ids, s, e)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        paged.evict_span([*ids, 2048], 0, 4)  # the tiny Llama's vocabulary is 2048: an id after `end`
    freed = sum(paged.evict_span(ids, s, e) for s, e in spans)
    evicted = _evicted(spans, p, n)
    assert freed == sum(e - s for s, e in evicted)
    want = _recomputed(evicted, p, n)
    before = _cache(paged)["stats"]
    got = paged.generate(**kw)
    _compare(got, cold.generate(**kw), (p, spans))
    assert got["meta_info"]["hole_spans"] == want, (p, spans)
    after = _cache(paged)["stats"]
    assert after["hole_requests"] - before["hole_requests"] == 1 and after["fallbacks"] == before["fallbacks"]
    _check_pool(paged)
    assert paged.flush_cache().success
    assert _check_pool(paged)["available"] == 4096
