"""The scheduler hooks' per-request decisions without an engine (SGLang objects stood in for)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sglang_holes.cache.node import Segment
from sglang_holes.patches.scheduler.request_holes import HoleFill, RequestHoles
from tests.test_radix_cache_locks import _cache


def test_a_match_sglang_replaced_is_not_used():
    """SGLANG_RADIX_FORCE_MISS (or anything else) replaces our match after match_prefix: the
    reused spans are not locked for the request, so its fill is dropped (stock extend)."""
    from sglang_holes.patches.scheduler.extend import _plan_request

    cache = _cache()
    cache.no_hole_batches = None  # the server's capabilities: hole batches run
    node = object()
    fill = HoleFill(tree_owned=2, reused=6, segments=(Segment(0, 2, torch.arange(2)), Segment(2, 4, None),
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
    from sglang_holes.patches.serving.meta_info import record_recomputed

    req = SimpleNamespace(customized_info=None, retracted_stain=False)
    record_recomputed(req, [(10, 20)], continued=False)
    record_recomputed(req, [(20, 30), (99, 100)], continued=True)  # a later chunk
    assert req.customized_info["hole_spans"] == [[10, 30], [99, 100]]
    assert req.customized_info["recomputed_tokens"] == [21]
    req.retracted_stain = True  # retracted while decoding, prefilled again with its output tokens
    record_recomputed(req, [(0, 105)], continued=False)
    assert req.customized_info["hole_spans"] == [[10, 30], [99, 100]]
    assert req.customized_info["recomputed_tokens"] == [21]


def test_a_failed_chunk_copy_computes_those_positions_instead(caplog):
    """A per-request failure while copying chunk KV (placement) is that request's alone: its copied
    positions become queries (computed exactly into the same, own slots), logged with its rid and
    counted; the row, the ledger and the counters are as for any committed extend."""
    from sglang_holes.cache.extend_plan import plan_piece
    from sglang_holes.chunks.hints import ChunkHints
    from sglang_holes.chunks.placement import ChunkFill
    from sglang_holes.chunks.state import ChunkState
    from sglang_holes.patches.scheduler.extend import _commit_piece

    cache = _cache()
    # 8 positions: [0, 2) read in place, [2, 5) a moved chunk (copied, delta 5), [5, 8) computed
    recompute = torch.tensor([False] * 5 + [True] * 3)
    delta = torch.tensor([0, 0, 5, 5, 5, 0, 0, 0])
    src = torch.tensor([40, 41, 50, 51, 52, -1, -1, -1])
    plan = ChunkFill(recompute, src, delta)
    fill = HoleFill(0, 2, plan.segments(), node=object(), chunk=plan, order=plan.order)

    def broken(*_):
        raise RuntimeError("copy kernel failed")

    hints = ChunkHints(((0, 2), (2, 5)), "none")
    state = ChunkState(hints, None, [object(), object()])
    cache.chunks = SimpleNamespace(copy_in=broken,
                                   committed=lambda req, reused: setattr(state, "reused_tokens", reused))
    req = SimpleNamespace(rid="r-9", holes=RequestHoles(hints, fill=fill, chunk=state),
                          kv=SimpleNamespace(req_pool_idx=1), full_untruncated_fill_ids=list(range(100, 108)),
                          retracted_stain=False, customized_info=None, cached_tokens=2)
    batch = SimpleNamespace(req_to_token_pool=SimpleNamespace(req_to_token=torch.zeros(2, 16, dtype=torch.int32)))
    extend = plan_piece(plan.order, 0, 6, plan.copied)
    assert extend.copies == 3
    with caplog.at_level("ERROR", logger="sglang_holes"):
        ids, committed = _commit_piece(cache, batch, req, extend, torch.arange(10, 16))
    assert committed.copies == 0 and committed.queries.tolist() == [2, 3, 4, 5, 6, 7]
    assert committed.spans == ((2, 8),) and ids.tolist() == list(range(102, 108))
    assert batch.req_to_token_pool.req_to_token[1, :8].tolist() == [40, 41, 10, 11, 12, 13, 14, 15]
    assert cache.ledger.not_owned(1) == [(0, 2)]  # the in-place chunk stays the store's
    assert cache.stats["request_errors"] == 1 and "r-9" in caplog.text
    # Reported as reused: the in-place chunk only (the copies were computed); SGLang's count unchanged.
    assert state.reused_tokens == 2 and req.cached_tokens == 2
    assert (cache.stats["chunk_requests"], cache.stats["chunk_reused_tokens"]) == (1, 2)


def test_store_computed_keeps_what_the_store_admits_and_frees_what_it_drops():
    """The checkpoint after a prefill piece offers the finished chunks to a full store (6 tokens): a
    chunk used more often than the entry it displaces is stored (the dropped entry's slots go back
    to the allocator, its tokens counted); a one-off chunk that could only displace a popular entry
    is not kept and stays the request's own."""
    from sglang_holes.chunks.hints import ChunkHints
    from sglang_holes.chunks.rope import RopeSpec
    from sglang_holes.chunks.state import ChunkState
    from sglang_holes.patches.scheduler.chunk_reuse import ChunkReuse

    freed: list[int] = []
    alloc = SimpleNamespace(device="cpu", free=lambda slots: freed.extend(slots.tolist()))
    reuse = ChunkReuse(alloc, RopeSpec.from_config({"rope_theta": 1e4, "hidden_size": 8, "num_attention_heads": 2}),
                       store_tokens=6)
    reuse.store.insert([90, 91, 92, 93], torch.arange(200, 204), 0)  # used once, long ago
    reuse.store.record_use([90, 91, 92, 93])
    hot, _ = reuse.store.insert([80, 81], torch.arange(300, 302), 0)  # popular: the store is full (6)
    for _ in range(5):
        reuse.store.record_use([80, 81])
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    for _ in range(3):
        reuse.store.record_use(ids[0:3])  # chunk [0, 3) is popular; [3, 6) is new
    hints = ChunkHints(((0, 3), (3, 6)), "none")
    req = SimpleNamespace(holes=RequestHoles(hints, chunk=ChunkState(hints, None, [None, None])),
                          origin_input_ids=ids)
    stored = reuse.store_computed(req, torch.arange(10, 18), up_to=8)
    assert stored.spans == [(0, 3)] and stored.dropped_tokens == 4 and freed == [200, 201, 202, 203]
    assert reuse.store.get(ids[0:3]).slots.tolist() == [10, 11, 12] and reuse.store.get(ids[3:6]) is None
    assert reuse.store.get([90, 91, 92, 93]) is None and reuse.store.get([80, 81]) is hot
    reuse.store.check_integrity()
    reuse.release(req)
    assert reuse.store.protected_size == 0
