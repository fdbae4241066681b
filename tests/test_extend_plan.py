"""The pure planning step of the extend hook, on plain tensors (no engine)."""

from __future__ import annotations

import pytest
import torch

from sglang_holes.cache.extend_plan import RowWrite, missing_positions, plan_extend, plan_hole_chunk
from sglang_holes.cache.node import Segment
from sglang_holes.chunks.hints import ChunkHints, recompute_mask
from sglang_holes.chunks.placement import borrowed_writes, plan_chunk_placement
from sglang_holes.chunks.store import ChunkStore

T = torch.tensor


def test_missing_positions_and_one_extend_for_the_whole_request():
    # Prompt of 12 tokens; the tree matched 11 (SGLang matches all but the last):
    # cached [0, 3), hole [3, 5), cached [5, 9), hole [9, 11).
    segs = [Segment(0, 3, T([100, 101, 102])), Segment(3, 5, None), Segment(5, 9, T([105, 106, 107, 108])),
            Segment(9, 11, None)]
    missing = missing_positions(segs, 12)
    assert missing.tolist() == [3, 4, 9, 10, 11]
    chunk = plan_hole_chunk(missing, 0, 5)
    assert chunk.first and chunk.last and chunk.positions.tolist() == [3, 4, 9, 10, 11]
    assert chunk.spans == ((3, 5), (9, 12)) and chunk.uncomputed == ()


def test_chunked_prefill_over_holes_takes_missing_tokens_in_position_order():
    segs = [Segment(0, 2, None), Segment(2, 6, T([2, 3, 4, 5])), Segment(6, 9, None), Segment(9, 12, T([9, 10, 11]))]
    missing = missing_positions(segs, 14)
    assert missing.tolist() == [0, 1, 6, 7, 8, 12, 13]
    chunks, done = [], 0
    for size in (3, 3, 1):  # SGLang's chunk budget of 3 tokens
        chunks.append(plan_hole_chunk(missing, done, size))
        done += size
    assert [c.positions.tolist() for c in chunks] == [[0, 1, 6], [7, 8, 12], [13]]
    assert [c.uncomputed for c in chunks] == [((7, 9), (12, 14)), ((13, 14),), ()]
    assert [(c.first, c.last) for c in chunks] == [(True, False), (False, False), (False, True)]
    # Every query of a chunk sits after everything before it is present: reused or computed earlier.
    for c in chunks:
        before = set(missing[: c.computed_before].tolist())
        for p in c.positions.tolist():
            assert all(q in before or q in c.positions.tolist() or q not in missing.tolist() for q in range(p))


def test_hole_chunk_bounds():
    missing = torch.arange(4)
    with pytest.raises(ValueError, match="an extend of 5"):
        plan_hole_chunk(missing, 0, 5)
    with pytest.raises(ValueError):
        plan_hole_chunk(missing, 4, 1)


def test_bad_plans_are_refused():
    keep = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match="covers a recomputed position"):
        plan_extend(0, keep, torch.arange(3), [RowWrite(0, 2, T([8, 9]))])
    with pytest.raises(ValueError, match="allocated slots"):
        plan_extend(0, keep, torch.arange(4), [RowWrite(1, 2, T([9]))])
    with pytest.raises(ValueError, match="does not fit"):
        plan_extend(0, keep, torch.arange(3), [RowWrite(1, 3, T([9]))])


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
    plan = plan_extend(0, keep, slots, writes)
    assert plan.positions.tolist() == [0, 1, 3, 6, 7]  # BOS, each chunk's first token, the question
    assert plan.surplus.tolist() == [202]  # only position 2 borrows; copied-into slots stay the request's
    assert plan.reused == 3 and plan.borrowed == ((2, 3),)

