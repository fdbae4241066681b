"""The scheduler hooks' per-request decisions without an engine (SGLang objects stood in for)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sglang_holes.cache.node import Segment
from sglang_holes.patches.request_holes import HoleFill, RequestHoles
from tests.test_radix_cache_locks import _cache


def test_a_match_sglang_replaced_is_not_used():
    """SGLANG_RADIX_FORCE_MISS (or anything else) replaces our match after match_prefix: the
    reused spans are not locked for the request, so its fill is dropped (stock extend)."""
    from sglang_holes.patches.schedule_batch import _plan_request

    cache = _cache()
    cache.hole_extend = True
    node = object()
    fill = HoleFill(prefix_len=2, reused=6, segments=(Segment(0, 2, torch.arange(2)), Segment(2, 4, None),
                                                      Segment(4, 8, torch.arange(4, 8))), node=node)
    req = SimpleNamespace(holes=RequestHoles(None, fill=fill), prefix_len=0, last_node=cache.root_node,
                          full_untruncated_fill_ids=list(range(9)), rid="r",
                          kv=SimpleNamespace(cache_protected_len=2))  # SGLang's _replace kept our P0
    assert _plan_request(cache, req, torch.arange(9)) is None and req.holes.fill is None
    assert req.kv.cache_protected_len == 0  # the row is the request's own: none of it is the tree's
    fill.computed = 0
    req = SimpleNamespace(holes=RequestHoles(None, fill=fill), prefix_len=6, last_node=node,
                          full_untruncated_fill_ids=list(range(9)), rid="r")
    chunk = _plan_request(cache, req, torch.arange(3))
    assert chunk.positions.tolist() == [2, 3, 8]


def test_meta_info_spans_of_a_retracted_request_keep_its_first_prefill():
    """SGLang counts cached_tokens at the first admission only; the spans must match that prefill."""
    from sglang_holes.patches.meta_info import record_recomputed

    req = SimpleNamespace(customized_info=None, retracted_stain=False)
    record_recomputed(req, [(10, 20)], continued=False)
    record_recomputed(req, [(20, 30), (99, 100)], continued=True)  # a later chunk
    assert req.customized_info["hole_spans"] == [[10, 30], [99, 100]]
    assert req.customized_info["recomputed_tokens"] == [21]
    req.retracted_stain = True  # retracted while decoding, prefilled again with its output tokens
    record_recomputed(req, [(0, 105)], continued=False)
    assert req.customized_info["hole_spans"] == [[10, 30], [99, 100]]
    assert req.customized_info["recomputed_tokens"] == [21]
