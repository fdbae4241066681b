"""The pure planning step of the extend hook, on plain tensors (no engine)."""

from __future__ import annotations

import pytest
import torch

from sglang_holes.cache.extend_plan import RowWrite, plan_extend, plan_hole_extend
from sglang_holes.cache.node import Segment
from sglang_holes.chunks.hints import ChunkHints, recompute_mask
from sglang_holes.chunks.placement import borrowed_writes, plan_chunk_placement
from sglang_holes.chunks.store import ChunkStore

T = torch.tensor


def test_hole_request_reuses_every_segment_beyond_the_prefix():
    # Prompt of 12 tokens; the tree matched 11 (SGLang matches all but the last):
    # cached [0, 3), hole [3, 5), cached [5, 9), hole [9, 11); P0 = 3.
    segs = [Segment(0, 3, T([100, 101, 102])), Segment(3, 5, None), Segment(5, 9, T([105, 106, 107, 108])),
            Segment(9, 11, None)]
    allocated = torch.arange(500, 509)  # positions 3..11
    plan = plan_hole_extend(3, segs, allocated)
    assert plan.kind == "hole" and plan.seq_len == 12
    assert plan.positions.tolist() == [3, 4, 9, 10, 11]
    assert plan.missing == [(3, 5), (9, 12)] and plan.holes_filled == 1
    assert (plan.recomputed, plan.reused) == (5, 7)
    assert plan.borrowed == ((5, 9),)
    assert [(w.start, w.end, w.slots.tolist()) for w in plan.row_writes] == [(5, 9, [105, 106, 107, 108])]
    assert plan.surplus.tolist() == [502, 503, 504, 505]  # allocated for 5..8, not used
    assert plan.keep.tolist() == [True, True, False, False, False, False, True, True, True]
    assert allocated.tolist() == list(range(500, 509))  # inputs untouched


def test_hole_at_position_zero_and_no_hole():
    plan = plan_hole_extend(0, [Segment(0, 2, None), Segment(2, 6, T([2, 3, 4, 5]))], torch.arange(10, 17))
    assert plan.missing == [(0, 2), (6, 7)] and plan.reused == 4
    plain = plan_hole_extend(4, [Segment(0, 4, T([0, 1, 2, 3]))], torch.arange(20, 23))
    assert plain.positions.tolist() == [4, 5, 6] and plain.borrowed == () and plain.surplus.numel() == 0


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="straddles"):
        plan_hole_extend(2, [Segment(0, 4, T([0, 1, 2, 3]))], torch.arange(4))
    keep = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match="covers a recomputed position"):
        plan_extend("hole", 0, keep, torch.arange(3), [RowWrite(0, 2, T([8, 9]))])
    with pytest.raises(ValueError, match="allocated slots"):
        plan_extend("hole", 0, keep, torch.arange(4), [RowWrite(1, 2, T([9]))])
    with pytest.raises(ValueError, match="does not fit"):
        plan_extend("hole", 0, keep, torch.arange(3), [RowWrite(1, 3, T([9]))])


def test_chunk_placement_copies_moved_chunks_and_borrows_unmoved_ones():
    store = ChunkStore()
    a, _ = store.insert([1, 2, 3], T([40, 41, 42]), 4, "ns")  # stored at offset 4
    b, _ = store.insert([7, 8], T([50, 51]), 1, "ns")  # stored at offset 1
    # Prompt: BOS | chunk b at [1, 3) (same offset) | chunk a at [3, 6) (moved by -1) | question [6, 8)
    slots = torch.arange(200, 208)
    placement = plan_chunk_placement([(1, 3), (3, 6)], [b, a], slots)
    assert placement.reused == (True, True)
    assert len(placement.copies) == 1 and placement.copies[0].delta == -1
    assert placement.copies[0].dst.tolist() == [203, 204, 205]
    assert placement.cached.tolist() == [200, 50, 51, 203, 204, 205, 206, 207]
    hints = ChunkHints(((1, 3), (3, 6)), "first_k", k=1)
    keep = recompute_mask(8, hints, [True, True])
    writes = borrowed_writes(keep, placement.cached, slots)
    assert [(w.start, w.end, w.slots.tolist()) for w in writes] == [(2, 3, [51])]  # b's first token recomputed
    plan = plan_extend("chunk", 0, keep, slots, writes)
    assert plan.positions.tolist() == [0, 1, 3, 6, 7]  # BOS, each chunk's first token, the question
    assert plan.surplus.tolist() == [202]  # only position 2 borrows; copied-into slots stay the request's
    assert plan.reused == 3 and plan.borrowed == ((2, 3),)
