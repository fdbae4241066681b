"""HolePlan: validation, compacted positions, and the exact FlashInfer plan() inputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sglang_holes import HolePlan, spans_from_inclusive
from sglang_holes.attention.flashinfer_interpreter import (
    interpret_plan,
    interpret_run,
    packbits_little,
    segment_packbits,
)
from tests.holes_data import make_batch, rel_err


def test_q_positions_compacted_in_order():
    plan = HolePlan.from_holes([10, 6], [[(1, 3), (7, 10)], [(0, 1), (5, 6)]])
    assert plan.q_positions.tolist() == [1, 2, 7, 8, 9, 0, 5]
    assert plan.q_seq.tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert plan.seq_q_indptr.tolist() == [0, 5, 7]
    assert plan.num_queries == 7 and plan.kv_len(0) == 10 and plan.kv_len(1) == 6
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.page_size = 2


def test_adjacent_spans_merge_into_one_run():
    plan = HolePlan.from_holes([20], [[(2, 3), (3, 4), (4, 8), (10, 11)]])
    assert plan.runs == ((0, 2, 8), (0, 10, 11))
    assert plan.holes == (((2, 3), (3, 4), (4, 8), (10, 11)),)


def test_inclusive_form():
    assert spans_from_inclusive([0, 0, 3, 7, 9, 9]) == [(0, 1), (3, 8), (9, 10)]
    assert spans_from_inclusive([]) == []
    with pytest.raises(ValueError, match="even count"):
        spans_from_inclusive([1, 2, 3])
    with pytest.raises(ValueError, match="i0 <= i1"):
        spans_from_inclusive([3, 2])
    with pytest.raises(ValueError, match="i1 < i2"):
        spans_from_inclusive([0, 2, 2, 4])


@pytest.mark.parametrize(
    "seq_lens, holes, message",
    [
        ([10], [[(3, 3)]], r"sequence 0: span \[3, 3\) is empty or reversed"),
        ([10], [[(5, 2)]], r"sequence 0: span \[5, 2\) is empty or reversed"),
        ([10, 8], [[(0, 1)], [(6, 9)]], r"sequence 1: span \[6, 9\) is outside \[0, 8\)"),
        ([10], [[(-1, 2)]], r"outside \[0, 10\)"),
        ([10], [[(4, 6), (1, 3)]], r"sequence 0: span \[1, 3\) overlaps or precedes"),
        ([10], [[(1, 5), (4, 6)]], r"span \[4, 6\) overlaps"),
        ([10], [[(1.0, 5)]], "non-integer"),
        ([10], [[(1, 2, 3)]], "not a \\(start, end\\) pair"),
        ([0], [[]], "seq_len must be a positive int"),
        ([10, 10], [[(1, 2)]], "2 sequences but holes has 1"),
    ],
)
def test_validation_errors_name_sequence_and_span(seq_lens, holes, message):
    with pytest.raises(ValueError, match=message):
        HolePlan.from_holes(seq_lens, holes)


def test_bad_page_size():
    with pytest.raises(ValueError, match="page_size"):
        HolePlan.from_holes([4], [[(0, 1)]], page_size=0)


def test_flashinfer_inputs_custom_mask_exact():
    plan = HolePlan.from_holes([6, 5], [[(1, 2), (4, 5)], [(3, 5)]])
    slots = [torch.tensor([10, 11, 12, 13, 14, 15]), torch.tensor([20, 21, 22, 23, 24])]
    kw = plan.flashinfer_inputs("custom_mask", slots)
    assert kw["qo_indptr"].tolist() == [0, 2, 4]
    assert kw["paged_kv_indptr"].tolist() == [0, 5, 10]  # KV = [0, last_end): 5 and 5 tokens
    assert kw["paged_kv_indices"].tolist() == [10, 11, 12, 13, 14, 20, 21, 22, 23, 24]
    assert kw["paged_kv_last_page_len"].tolist() == [1, 1]
    assert kw["causal"] is False and kw["page_size"] == 1 and kw["window_left"] == -1
    assert all(kw[k].dtype == torch.int32 and kw[k].device.type == "cpu"
               for k in ("qo_indptr", "paged_kv_indptr", "paged_kv_indices", "paged_kv_last_page_len"))
    m = kw["custom_mask"]
    assert m.dtype == torch.bool and "packed_custom_mask" not in kw  # never packed (0.7.2 pitfall 1)
    expected = [1, 1, 0, 0, 0,  1, 1, 1, 1, 1,  # seq 0: pos 1, pos 4 over 5 keys
                1, 1, 1, 1, 0,  1, 1, 1, 1, 1]  # seq 1: pos 3, pos 4 over 5 keys
    assert m.int().tolist() == expected


def test_flashinfer_inputs_spans_exact_paged():
    plan = HolePlan.from_holes([11], [[(0, 2), (5, 6), (6, 9)]], page_size=4)
    slots = (torch.tensor([7, 2, 5]).repeat_interleave(4) * 4 + torch.arange(12) % 4)[:11]
    kw = plan.flashinfer_inputs("spans", [slots])
    assert kw["qo_indptr"].tolist() == [0, 2, 6]  # runs [0,2) and [5,9) (adjacent spans merged)
    assert kw["paged_kv_indptr"].tolist() == [0, 1, 4]
    assert kw["paged_kv_indices"].tolist() == [7, 7, 2, 5]
    assert kw["paged_kv_last_page_len"].tolist() == [2, 1]  # kv 2 tokens; kv 9 tokens = 2 pages + 1
    assert kw["causal"] is True and "custom_mask" not in kw and kw["page_size"] == 4


def test_misaligned_pages_are_rejected():
    plan = HolePlan.from_holes([5], [[(1, 5)]], page_size=4)
    with pytest.raises(ValueError, match="not page-aligned"):
        plan.flashinfer_inputs("spans", [torch.tensor([0, 1, 2, 3, 9])])
    with pytest.raises(ValueError, match="needs 5"):
        plan.flashinfer_inputs("spans", [torch.tensor([0, 1])])
    with pytest.raises(ValueError, match="unknown FlashInfer path"):
        plan.flashinfer_inputs("ragged", [torch.arange(5)])
    with pytest.raises(ValueError, match="1 sequences"):
        plan.flashinfer_inputs("spans", [torch.arange(5), torch.arange(5)])


# --------------------------------------------------------------- the interpreter itself


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 64, 333])
def test_packbits_matches_numpy_little(n):
    bits = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
    np_ref = np.packbits(bits.numpy(), bitorder="little")
    assert packbits_little(bits).numpy().tolist() == np_ref.tolist()


def test_segment_packbits_pads_each_request_to_bytes():
    mask = torch.ones(3 + 10, dtype=torch.bool)
    packed, indptr = segment_packbits(mask, torch.tensor([0, 3, 13]))
    assert indptr.tolist() == [0, 1, 3]  # byte offsets: 1 byte, then 2 bytes
    assert packed.tolist() == [0b111, 0xFF, 0b11]


def test_causal_is_bottom_right_aligned():
    """qo=2 over kv=5: query 0 sees keys 0..3, query 1 sees 0..4 (not 0..0 / 0..1)."""
    kw = {"qo_indptr": torch.tensor([0, 2]), "paged_kv_indptr": torch.tensor([0, 5]),
          "paged_kv_indices": torch.arange(5), "paged_kv_last_page_len": torch.tensor([1]),
          "page_size": 1, "causal": True}
    ip = interpret_plan(**kw)
    v = torch.eye(5).view(5, 1, 5)
    k = torch.zeros(5, 1, 5)  # uniform scores: output = mean of visible values
    out = interpret_run(ip, torch.zeros(2, 1, 5), (k.view(5, 1, 1, 5), v.view(5, 1, 1, 5)))
    assert torch.allclose(out[0, 0], torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0]))
    assert torch.allclose(out[1, 0], torch.full((5,), 0.2))


def test_interpreter_reproduces_packed_mask_pitfall():
    """Packing a B > 1 mask yourself and passing packed_custom_mask gives WRONG results on
    0.7.2 (element-unit indptr read as bytes); the boolean custom_mask is right. The plan
    must therefore never pass a packed mask, and the interpreter would catch it if it did."""
    b = make_batch([13, 11], [[(2, 5), (9, 13)], [(0, 3), (7, 8)]], 1, Hq=2, Hkv=1, D=8, seed=5)
    kw = b.plan.flashinfer_inputs("custom_mask", b.slot_table)
    kv = (b.k_cache.view(-1, 1, 1, 8), b.v_cache.view(-1, 1, 1, 8))
    good = interpret_run(interpret_plan(**kw), b.q, kv)
    assert rel_err(good, b.expected) <= 1e-5
    packed = dict(kw, packed_custom_mask=packbits_little(kw.pop("custom_mask")))
    try:
        bad = interpret_run(interpret_plan(**packed), b.q, kv)
    except IndexError:
        return  # it read past the mask buffer: garbage memory on a GPU
    assert rel_err(bad, b.expected) > 1e-2


def test_interpreter_shows_window_under_custom_mask_is_compacted():
    """FlashInfer applies window_left at the compacted index under a custom mask; passing the
    window to FlashInfer there would be wrong, which is why the plan folds it into the mask."""
    b = make_batch([30], [[(3, 6), (20, 24)]], 1, Hq=2, Hkv=1, D=8, seed=7, window_left=4)
    kv = (b.k_cache.view(-1, 1, 1, 8), b.v_cache.view(-1, 1, 1, 8))
    right = b.plan.flashinfer_inputs("custom_mask", b.slot_table, window_left=4)
    assert rel_err(interpret_run(interpret_plan(**right), b.q, kv), b.expected) <= 1e-5
    naive = dict(b.plan.flashinfer_inputs("custom_mask", b.slot_table), window_left=4)
    assert rel_err(interpret_run(interpret_plan(**naive), b.q, kv), b.expected) > 1e-2


def test_interpreter_rejects_wrong_mask_length():
    plan = HolePlan.from_holes([6], [[(1, 3)]])
    kw = plan.flashinfer_inputs("custom_mask", [torch.arange(6)])
    kw["custom_mask"] = kw["custom_mask"][:-1]
    with pytest.raises(ValueError, match="flashinfer#3176"):
        interpret_plan(**kw)


def test_spans_from_positions():
    from sglang_holes.attention.plan import spans_from_positions

    assert spans_from_positions([2, 3, 4, 9, 11, 12]) == [(2, 5), (9, 10), (11, 13)]
    assert spans_from_positions([]) == []
