"""The pure planning step of the extend hook, on plain tensors (no engine)."""

from __future__ import annotations

import pytest
import torch

from sglang_holes.cache.extend_plan import missing_positions, plan_piece
from sglang_holes.cache.node import Segment
from sglang_holes.chunks.hints import ChunkHints, recompute_mask, reused_count
from sglang_holes.chunks.placement import plan_chunk_fill
from sglang_holes.chunks.store import ChunkStore

T = torch.tensor


def test_missing_positions_and_one_extend_for_the_whole_request():
    # Prompt of 12 tokens; the tree matched 11 (SGLang matches all but the last):
    # cached [0, 3), hole [3, 5), cached [5, 9), hole [9, 11).
    segs = [Segment(0, 3, T([100, 101, 102])), Segment(3, 5, None), Segment(5, 9, T([105, 106, 107, 108])),
            Segment(9, 11, None)]
    missing = missing_positions(segs, 12)
    assert missing.tolist() == [3, 4, 9, 10, 11]
    chunk = plan_piece(missing, 0, 5)
    assert chunk.first and chunk.last and chunk.positions.tolist() == [3, 4, 9, 10, 11]
    assert chunk.spans == ((3, 5), (9, 12)) and chunk.uncomputed == ()


def test_chunked_prefill_over_holes_takes_missing_tokens_in_position_order():
    segs = [Segment(0, 2, None), Segment(2, 6, T([2, 3, 4, 5])), Segment(6, 9, None), Segment(9, 12, T([9, 10, 11]))]
    missing = missing_positions(segs, 14)
    assert missing.tolist() == [0, 1, 6, 7, 8, 12, 13]
    chunks, done = [], 0
    for size in (3, 3, 1):  # SGLang's chunk budget of 3 tokens
        chunks.append(plan_piece(missing, done, size))
        done += size
    assert [c.positions.tolist() for c in chunks] == [[0, 1, 6], [7, 8, 12], [13]]
    assert [c.uncomputed for c in chunks] == [((7, 9), (12, 14)), ((13, 14),), ()]
    assert [(c.first, c.last) for c in chunks] == [(True, False), (False, False), (False, True)]
    # Every query of a chunk sits after everything before it is present: reused or computed earlier.
    for c in chunks:
        before = set(missing[: c.computed_before].tolist())
        for p in c.positions.tolist():
            assert all(q in before or q in c.positions.tolist() or q not in missing.tolist() for q in range(p))


def test_prefill_piece_bounds():
    missing = torch.arange(4)
    with pytest.raises(ValueError, match="an extend of 5"):
        plan_piece(missing, 0, 5)
    with pytest.raises(ValueError):
        plan_piece(missing, 4, 1)


def _fill():
    store = ChunkStore()
    a, _ = store.insert([1, 2, 3], T([40, 41, 42]), 4, "ns")  # stored at offset 4
    b, _ = store.insert([7, 8], T([50, 51]), 1, "ns")  # stored at offset 1
    # Prompt: BOS | chunk b at [1, 3) (same offset) | chunk a at [3, 6) (moved by -1) | question [6, 8)
    hints = ChunkHints(((1, 3), (3, 6)), "first_k", k=1)
    return plan_chunk_fill(hints.chunks, [b, a], recompute_mask(8, hints, [True, True]))


def test_chunk_fill_borrows_unmoved_chunks_and_copies_moved_ones():
    fill = _fill()
    assert fill.recompute.nonzero().flatten().tolist() == [0, 1, 3, 6, 7]  # BOS, each chunk's first token, question
    assert fill.borrowed.nonzero().flatten().tolist() == [2]  # b's second token, read in place
    assert fill.copied.nonzero().flatten().tolist() == [4, 5]  # a moved: copied, K re-rotated by -1
    assert fill.src.tolist() == [-1, -1, 51, -1, 41, 42, -1, -1]
    assert fill.delta.tolist() == [0, 0, 0, 0, -1, -1, 0, 0]
    assert [(g.start, g.end, g.slots.tolist()) for g in fill.segments()] == [(2, 3, [51])]
    assert fill.order.tolist() == [0, 1, 3, 4, 5, 6, 7] and fill.reused == 3


def test_chunk_fill_in_virtual_order_copies_then_computes_each_extend():
    """SGLang admits the in-place position as the prefix and chunks the rest (copies included) by
    its budget; each extend copies its copied positions and computes the others."""
    fill = _fill()
    pieces, done = [], 0
    for size in (3, 2, 2):
        pieces.append(plan_piece(fill.order, done, size, fill.copied))
        done += size
    assert [p.positions.tolist() for p in pieces] == [[0, 1, 3], [4, 5], [6, 7]]
    assert [p.queries.tolist() for p in pieces] == [[0, 1, 3], [5], [6, 7]]  # [4, 5]: no query: 5 computed
    assert [p.copies for p in pieces] == [0, 1, 0]
    assert pieces[1].spans == ((5, 6),) and pieces[2].last


def test_chunk_fill_refuses_reuse_outside_stored_chunks():
    store = ChunkStore()
    a, _ = store.insert([1, 2, 3], T([40, 41, 42]), 0)
    with pytest.raises(ValueError, match="entry of 3 tokens"):
        plan_chunk_fill([(0, 2)], [a], torch.tensor([False, True]))
    with pytest.raises(ValueError, match="outside every stored chunk"):
        plan_chunk_fill([(0, 3)], [a], torch.tensor([False, False, False, False, True]))


def test_reused_count_is_known_before_deviation_scores():
    """SGLang must be told how many positions a chunk request reuses before its deviation probe picks which."""
    hints = ChunkHints(((0, 10), (10, 22)), "deviation", ratio=0.25)
    expect = reused_count(30, hints, [True, True], forced_from=20)
    for seed in range(5):
        scores = torch.rand(30, generator=torch.Generator().manual_seed(seed))
        mask = recompute_mask(30, hints, [True, True], scores, forced_from=20)
        assert int((~mask).sum()) == expect == 20 - round(0.25 * 20)
        assert mask[20:].all()  # input-logprob positions always run
