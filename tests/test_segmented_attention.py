"""Segmented prefill against dense causal attention: the reference, and the exact
FlashInfer inputs run through a pure-torch interpreter of FlashInfer's semantics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_holes import AttentionParams, FlashInferHoleAttention, segmented_attention
from sglang_holes.attention import KVCache, Scoring
from sglang_holes.attention.flashinfer_interpreter import InterpretedPrefillWrapper, interpret_plan, interpret_run
from tests.holes_data import batches, make_batch, rel_err

# fp32 inputs, fp32 accumulation vs a float64 oracle: rounding is ~1e-7 per operation
# and sequences are short, so 1e-5 leaves ~100x headroom without hiding a wrong mask
# (one wrong key changes a row by O(1)).
TOL = 1e-5
FAST = settings(max_examples=60, deadline=None)



def _kv(batch) -> KVCache:
    return KVCache(batch.k_cache, batch.v_cache, batch.slot_table)

def _interpreted(batch, path):
    kw = batch.plan.flashinfer_inputs(path, batch.slot_table)
    ip = interpret_plan(**kw)
    P = batch.plan.page_size
    kv = (batch.k_cache.view(-1, P, *batch.k_cache.shape[1:]), batch.v_cache.view(-1, P, *batch.v_cache.shape[1:]))
    return interpret_run(ip, batch.q, kv)


@FAST
@given(batches(), st.sampled_from(["reference", "sdpa"]))
def test_cpu_paths_equal_dense_causal(batch, backend):
    out = segmented_attention(batch.q, _kv(batch), batch.plan, backend)
    assert out.shape == batch.expected.shape
    assert rel_err(out, batch.expected) <= TOL


@FAST
@given(batches(), st.sampled_from(["custom_mask", "spans"]))
def test_flashinfer_inputs_interpreted_equal_dense(batch, path):
    out = _interpreted(batch, path)
    assert rel_err(out, batch.expected) <= TOL


@FAST
@given(batches(max_len=24), st.sampled_from(["custom_mask", "spans", "per_span"]))
def test_runner_plan_run_with_interpreted_wrapper(batch, path):
    """The runner's own plan()/run() calls, against a stand-in that interprets FlashInfer."""
    params = AttentionParams(batch.q.shape[1], batch.k_cache.shape[1], batch.q.shape[2],
                             torch.float32, torch.float32)
    runner = FlashInferHoleAttention(params, "cpu", wrapper_factory=InterpretedPrefillWrapper, workspace_bytes=8)
    runner.plan(batch.plan, batch.slot_table, path)
    out = runner.run(batch.q, batch.k_cache, batch.v_cache)
    assert rel_err(out, batch.expected) <= TOL
    # plan once, run per layer: a second layer's data through the same plan
    out2 = runner.run(batch.q * 0.5, batch.k_cache, batch.v_cache)
    ref2 = segmented_attention(batch.q * 0.5, _kv(batch), batch.plan, "reference")
    assert rel_err(out2, ref2) <= TOL


CASES = {
    "span_at_zero": ([30], [[(0, 5)]]),
    "span_to_end": ([30], [[(22, 30)]]),
    "single_tokens": ([30], [[(0, 1), (7, 8), (29, 30)]]),
    "adjacent_tiny": ([30], [[(k, k + 1) for k in range(10, 20)]]),
    "whole_sequence": ([17], [[(0, 17)]]),
    "mixed_batch": ([9, 33, 1], [[(3, 4)], [(0, 2), (2, 9), (20, 33)], [(0, 1)]]),
    "seq_without_holes": ([12, 20], [[], [(5, 9)]]),
    # >= 90% of the sequence missing: sdpa's dense causal path, with a cached token inside
    "dense_with_gap": ([40, 30], [[(0, 20), (21, 40)], [(2, 30)]]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("backend", ["reference", "sdpa", "custom_mask", "spans", "per_span"])
def test_named_cases(case, page_size, backend):
    seq_lens, holes = CASES[case]
    b = make_batch(seq_lens, holes, page_size, Hq=6, Hkv=2, D=16, seed=1)
    factory = None if backend in ("reference", "sdpa") else InterpretedPrefillWrapper
    out = segmented_attention(b.q, _kv(b), b.plan, backend, wrapper_factory=factory)
    assert rel_err(out, b.expected) <= TOL


@pytest.mark.parametrize("window_left, soft_cap", [(-1, 5.0), (3, None), (0, None), (6, 2.0)])
@pytest.mark.parametrize("backend", ["reference", "sdpa", "custom_mask", "spans"])
def test_window_and_soft_cap(window_left, soft_cap, backend):
    b = make_batch([40, 25], [[(0, 3), (10, 18), (39, 40)], [(4, 5), (6, 25)]], 2, Hq=4, Hkv=2, D=16, seed=3,
                   window_left=window_left, soft_cap=soft_cap, sm_scale=0.3)
    factory = None if backend in ("reference", "sdpa") else InterpretedPrefillWrapper
    out = segmented_attention(b.q, _kv(b), b.plan, backend, scoring=Scoring(0.3, soft_cap, window_left),
                              wrapper_factory=factory)
    assert rel_err(out, b.expected) <= TOL


def test_auto_is_sdpa_on_cpu():
    b = make_batch([20], [[(2, 5)]], 1, Hq=2, Hkv=1, D=8, seed=0)
    out = segmented_attention(b.q, _kv(b), b.plan)  # backend="auto"
    assert rel_err(out, b.expected) <= TOL


def test_flashinfer_backends_need_cuda_without_a_stand_in():
    b = make_batch([20], [[(2, 5)]], 1, Hq=2, Hkv=1, D=8, seed=0)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        segmented_attention(b.q, _kv(b), b.plan, "spans")
    with pytest.raises(ValueError, match="unknown backend"):
        segmented_attention(b.q, _kv(b), b.plan, "dense")


def test_q_rows_must_match_plan():
    b = make_batch([20], [[(2, 5)]], 1, Hq=2, Hkv=1, D=8, seed=0)
    with pytest.raises(ValueError, match="missing tokens"):
        segmented_attention(b.q[:2], _kv(b), b.plan, "reference")


def test_gqa_heads_must_divide():
    with pytest.raises(ValueError, match="multiple"):
        AttentionParams(num_qo_heads=5, num_kv_heads=2, head_dim=8)


@pytest.mark.parametrize("max_runs, path, split_used", [(0, "auto", False), (24, "auto", True),
                                                         (0, "spans", True), (24, "custom_mask", False)])
def test_sdpa_mask_free_split_and_masked_call_agree(monkeypatch, max_runs, path, split_used):
    """The CPU path's two strategies for a partly missing sequence: per run, two mask-free fused
    calls merged by log-sum-exp (``auto``: up to ``MAX_SPLIT_RUNS`` runs; ``spans``: always), else
    one masked call (``custom_mask``)."""
    import sglang_holes.attention.sdpa as sdpa

    calls = []
    split = sdpa._split_runs
    monkeypatch.setattr(sdpa, "MAX_SPLIT_RUNS", max_runs)
    monkeypatch.setattr(sdpa, "_split_runs", lambda *a: calls.append(len(a[3])) or split(*a))
    b = make_batch([200, 64, 9], [[(0, 3), (50, 61), (120, 122), (199, 200)], [(10, 30)], [(0, 9)]], 1,
                   Hq=6, Hkv=2, D=16, seed=3)
    out = sdpa.sdpa_attention(b.q, _kv(b), b.plan, path=path)
    assert rel_err(out, b.expected) <= TOL
    assert calls == ([4, 1] if split_used else [])  # the fully missing sequence takes the dense causal call
