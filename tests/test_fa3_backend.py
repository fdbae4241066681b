"""SGLang's FA3 backend (the Hopper default) on hole batches, on CPU, against the FA3 interpreter.

Everything around the kernel runs for real: the batch metadata the extend hook produces
(compacted queries at original positions, rows that interleave cached and new slots),
SGLang 0.5.23's own ``FlashAttentionBackend.init_forward_metadata`` (its extend metadata,
page table and page-size striding), our ``plan_hole_batch`` (one varlen segment per run,
``cache_seqlens`` = run end, the sequence's page-table row), then SGLang's own
``forward_extend`` (unchanged: it writes the new K/V through SGLang's real ``MHATokenToKVPool``,
builds the paged view and calls ``flash_attn_with_kvcache`` with its causal/window/soft-cap
arguments). Only the kernel is replaced, by ``flash_attn_interpreter.flash_attn_with_kvcache``,
a pure-torch model of its documented semantics (bottom-right causal and window, paged KV,
varlen queries). Outputs are compared with a float64 dense oracle.

Not covered on CPU: the CUDA kernel itself, and the backend's ``__init__`` (the object is
assembled with the attributes the two methods read).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sglang_holes.attention.flash_attn_interpreter import flash_attn_with_kvcache
from sglang_holes.attention.plan import HolePlan
from tests.backend_batches import CASES, HKV, HQ, LAYERS, TOL, D, HoleBatch, hole_batch, oracle
from tests.sgl_kernel_standin import fa3_backend_module


@pytest.fixture(scope="module")
def fa3():
    with fa3_backend_module() as stock:
        from sglang_holes.patches.attention import fa3 as fa3_backend

        yield SimpleNamespace(stock=stock, ours=fa3_backend)


def _backend(fa3, hb: HoleBatch, page_size: int, **overrides):
    """SGLang's FA3 backend as ``__init__`` leaves it for an MHA model, minus its CUDA parts."""
    b = object.__new__(fa3.ours.HoleFlashAttentionBackend)
    attrs = dict(
        forward_metadata=None, forward_metadata_spec_decode_expand=None, max_context_len=256, device="cpu",
        req_to_token_pool=SimpleNamespace(req_to_token=hb.req_to_token), req_to_token=hb.req_to_token,
        token_to_kv_pool=hb.pool, kv_cache_dtype=torch.float32, kv_cache_dtype_str="auto",
        kv_cache_is_mxfp8=False, page_size=page_size, use_mla=False, is_encoder_decoder=False,
        kv_index_translator=SimpleNamespace(is_translating=False), skip_prefill=False, attn_cp_size=1,
        use_sliding_window_kv_pool=False, _kv_shard_pool=None, topk=0, speculative_num_steps=0,
        speculative_step_id=0, local_attn_builder=None, has_local_attention=False, sliding_window_size=None,
        has_swa=False, is_prefill_aware_swa=False, fa_impl_ver=3, num_splits=0, full_cg_prefill_metadata=None,
        fa_skip_kv_cache=False,
    )
    attrs.update(overrides)
    for k, v in attrs.items():
        setattr(b, k, v)
    b.receive(hb.holes)  # what the ForwardBatch hook does before SGLang plans the forward
    return b


LAYER_KINDS = {  # RadixAttention keywords; the oracle's window and cap follow them
    "plain": {},
    "window 6 + soft cap 5": {"sliding_window_size": 6, "logit_cap": 5.0},
}


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("case", list(CASES))
def test_sglang_fa3_forward_extend_on_hole_batches_matches_oracle(fa3, case, page_size, kind):
    seq_lens, missing = CASES[case]
    hb = hole_batch(seq_lens, missing, seed=len(case), page_size=page_size)
    backend = _backend(fa3, hb, page_size)
    backend.init_forward_metadata(hb.fb)  # SGLang's metadata, then ours for the runs
    runs = len(HolePlan.from_holes(seq_lens, missing).runs)  # adjacent spans merged
    assert backend.forward_metadata.cu_seqlens_q.numel() == runs + 1
    scale = D**-0.5
    extra = LAYER_KINDS[kind]
    for layer_id in range(LAYERS):
        layer = RadixAttention(HQ, D, scale, HKV, layer_id, **extra)
        q = torch.randn(hb.fb.positions.numel(), HQ * D)
        k, v = hb.new_kv(layer_id)
        o = backend.forward_extend(q, k, v, layer, hb.fb)  # SGLang's own method
        want = oracle(hb, q.view(-1, HQ, D), layer_id, scale, window_left=extra.get("sliding_window_size", -1),
                      soft_cap=extra.get("logit_cap", 0.0))
        assert (o.view(-1, HQ, D).double() - want).abs().max().item() <= TOL
        assert torch.equal(hb.pool.k_buffer[layer_id][hb.fb.out_cache_loc], k)  # every hole's KV is saved


def test_stock_metadata_on_a_hole_batch_is_wrong(fa3):
    """Without our plan, SGLang's extend metadata runs a hole batch as if its queries were the
    sequence's tail: the comparison with the oracle has power to fail."""
    hb = hole_batch([37], [[(0, 3), (10, 15), (36, 37)]], seed=1)
    backend = _backend(fa3, hb, 1)
    fa3.stock.FlashAttentionBackend.init_forward_metadata(backend, hb.fb)
    layer = RadixAttention(HQ, D, D**-0.5, HKV, 0)
    q = torch.randn(hb.fb.positions.numel(), HQ * D)
    o = backend.forward_extend(q, *hb.new_kv(0), layer, hb.fb)
    assert (o.view(-1, HQ, D).double() - oracle(hb, q.view(-1, HQ, D), 0, D**-0.5)).abs().max() > 0.1


def test_run_metadata(fa3):
    """Runs of one sequence share its page-table row; cache_seqlens = run end; plain extends are one run."""
    hb = hole_batch([12, 9], [[(2, 4), (4, 5), (11, 12)], [(6, 9)]], seed=3)
    backend = _backend(fa3, hb, 1)
    backend.init_forward_metadata(hb.fb)
    meta = backend.forward_metadata
    assert meta.cu_seqlens_q.tolist() == [0, 3, 4, 7]  # (2, 5) merged, (11, 12), then (6, 9)
    assert meta.cache_seqlens_int32.tolist() == [5, 12, 9]
    assert meta.cu_seqlens_k.tolist() == [0, 5, 17, 26]
    assert (meta.max_seq_len_q, meta.max_seq_len_k) == (3, 12)
    rows = hb.req_to_token[[5, 5, 2]]
    assert torch.equal(meta.page_table[:, :9], rows[:, :9])
    assert meta.page_table.dtype == torch.int32 and meta.cu_seqlens_q.dtype == torch.int32


def test_batches_without_holes_keep_sglangs_metadata(fa3):
    hb = hole_batch([10, 7], [[(4, 10)], [(0, 7)]], seed=5)
    backend = _backend(fa3, hb, 1)
    assert fa3.ours.plan_hole_batch(backend, hb.fb, hb.holes) is None
    backend.init_forward_metadata(hb.fb)
    assert backend.forward_metadata.cu_seqlens_q.tolist() == [0, 6, 13]  # SGLang's own: one per request
    hb.fb.forward_mode = ForwardMode.DECODE
    assert fa3.ours.plan_hole_batch(backend, hb.fb, hb.holes) is None


@pytest.mark.parametrize("override, why", [
    ({"kv_cache_dtype_str": "fp8_e4m3"}, "quantized"),
    ({"local_attn_builder": object()}, "local"),
    ({"use_sliding_window_kv_pool": True}, "sliding-window"),
    ({"attn_cp_size": 2}, "context parallelism"),
])
def test_hole_batch_on_an_unsupported_fa3_backend_is_an_error(fa3, override, why):
    hb = hole_batch([12], [[(2, 4), (11, 12)]], seed=3)
    backend = _backend(fa3, hb, 1, **override)
    fa3.stock.FlashAttentionBackend.init_forward_metadata(_backend(fa3, hb, 1), hb.fb)
    backend.forward_metadata = SimpleNamespace(page_table=torch.zeros(1, 12, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=why):
        fa3.ours.plan_hole_batch(backend, hb.fb, hb.holes)


def test_interpreter_refuses_what_it_does_not_model():
    q = torch.randn(3, HQ, D)
    cache = torch.randn(4, 1, HKV, D)
    kw = dict(cache_seqlens=torch.tensor([3], dtype=torch.int32), page_table=torch.arange(3, dtype=torch.int32)[None],
              cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32), max_seqlen_q=3, causal=True)
    assert flash_attn_with_kvcache(q, cache, cache, **kw).shape == (3, HQ, D)
    with pytest.raises(NotImplementedError, match="k_descale"):
        flash_attn_with_kvcache(q, cache, cache, k_descale=torch.ones(1, HKV), **kw)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        flash_attn_with_kvcache(q, cache, cache, **{**kw, "max_seqlen_q": 2})
    with pytest.raises(ValueError, match="page_table"):
        flash_attn_with_kvcache(q, cache, cache, **{**kw, "cache_seqlens": torch.tensor([5], dtype=torch.int32)})
