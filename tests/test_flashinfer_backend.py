"""SGLang's FlashInfer backend on hole batches, on CPU, against the FlashInfer interpreter.

A GPU cannot run here, so this runs everything around the kernel for real: the batch
metadata the extend hook produces (compacted queries at original positions, rows that
interleave cached and new slots), ``plan_hole_batch`` of ``HoleFlashInferAttnBackend``
(our code: ``HolePlan`` -> the exact ``plan()`` keywords, on the backend's own paged
wrapper), then SGLang 0.5.23's own ``FlashInferAttnBackend.forward_extend`` (unchanged:
it writes the new K/V through SGLang's real ``MHATokenToKVPool`` and calls the wrapper's
``forward`` with its causal/scale/window arguments). Only the wrapper is replaced, by
``InterpretedPrefillWrapper``, a pure-torch model of FlashInfer 0.7.2's documented
plan()/run() semantics (bottom-right causal, byte-packed custom mask, ``forward``
overriding the plan's causal/scale/window). The output is compared with a float64
dense oracle of "each query attends to its sequence's keys at positions <= its own".

Not covered on CPU: the CUDA kernels themselves, and the parts of the backend's
``__init__`` that allocate CUDA workspaces (the backend object is assembled with the
attributes ``forward_extend`` and ``plan_hole_batch`` read). ``tests/test_gpu_flashinfer.py``
runs the real kernels when a GPU is present.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.attention.flashinfer_backend import PrefillMetadata
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sglang_holes.attention.flashinfer_interpreter import InterpretedPrefillWrapper
from sglang_holes.patches.attention.flashinfer import HoleFlashInferAttnBackend, plan_hole_batch
from tests.backend_batches import CASES, HKV, HQ, LAYERS, TOL, D, hole_batch, oracle


class _NoGlobalScale:
    @staticmethod
    def needs_global_scale() -> bool:
        return False


def _backend(req_to_token: torch.Tensor, pool: MHATokenToKVPool, path: str, num_wrappers: int = 1,
             page_size: int = 1):
    """SGLang's FlashInfer backend minus its CUDA workspaces, with the interpreter as its paged wrapper."""
    b = object.__new__(HoleFlashInferAttnBackend)
    b.hole_path = path
    b.page_size = page_size
    b.indices_updater_prefill = SimpleNamespace(num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D,
                                                q_data_type=torch.float32, data_type=torch.float32)
    b.req_to_token_pool = SimpleNamespace(req_to_token=req_to_token)
    b.token_to_kv_pool = pool
    b.prefill_wrappers_paged = [InterpretedPrefillWrapper()]
    b.num_wrappers = num_wrappers
    b.prefill_uses_dequant_workspace = False
    b.enable_mis = False
    b.kv_cache_quant_method = _NoGlobalScale()
    return b


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("path", ["custom_mask", "spans", "auto"])
@pytest.mark.parametrize("case", list(CASES))
def test_sglang_forward_extend_on_hole_batches_matches_oracle(path, case, page_size):
    seq_lens, missing = CASES[case]
    hb = hole_batch(seq_lens, missing, seed=len(case), page_size=page_size)
    backend = _backend(hb.req_to_token, hb.pool, path, page_size=page_size)
    backend.receive(hb.holes)  # what the ForwardBatch hook does before SGLang plans the forward
    backend.init_forward_metadata(hb.fb)  # the subclass method: plans the hole batch, never the stock path
    meta = backend.forward_metadata
    assert isinstance(meta, PrefillMetadata) and meta.use_ragged is False
    wrapper = backend.prefill_wrappers_paged[0]
    if path != "auto":
        assert (wrapper._plan.packed_mask is not None) == (path == "custom_mask")
    scale = D**-0.5
    for layer_id in range(LAYERS):
        layer = RadixAttention(HQ, D, scale, HKV, layer_id)
        q = torch.randn(hb.fb.positions.numel(), HQ * D)
        k, v = hb.new_kv(layer_id)
        o = backend.forward_extend(q, k, v, layer, hb.fb)  # SGLang's own method
        want = oracle(hb, q.view(-1, HQ, D), layer_id, scale)
        assert (o.view(-1, HQ, D).double() - want).abs().max().item() <= TOL
        assert torch.equal(hb.pool.k_buffer[layer_id][hb.fb.out_cache_loc], k)  # every hole's KV is saved


def test_plan_keywords_for_the_custom_mask_path():
    """The exact plan() inputs: one request per sequence, queries = missing tokens,
    KV = [0, seq_len), boolean mask j <= pos (FlashInfer packs it: never pre-packed)."""
    hb = hole_batch([12], [[(2, 4), (11, 12)]], seed=3)
    prefill = plan_hole_batch(_backend(hb.req_to_token, hb.pool, "custom_mask"), hb.fb, hb.holes, "custom_mask")
    kw = prefill.plan_kwargs
    assert kw["qo_indptr"].tolist() == [0, 3] and kw["paged_kv_indptr"].tolist() == [0, 12]
    assert kw["paged_kv_indices"].tolist() == hb.req_to_token[5, :12].tolist()
    assert kw["paged_kv_last_page_len"].tolist() == [1] and kw["page_size"] == 1
    assert "packed_custom_mask" not in kw and kw["custom_mask"].dtype == torch.bool
    mask = kw["custom_mask"].view(3, 12)
    assert mask.sum(1).tolist() == [3, 4, 12]  # positions 2, 3 and 11 see keys 0..pos
    assert (kw["num_qo_heads"], kw["num_kv_heads"], kw["head_dim_qk"]) == (HQ, HKV, D)


def test_plan_keywords_for_the_span_path():
    """One causal request per run of spans: KV = [0, end), bottom-right alignment = original positions."""
    hb = hole_batch([12], [[(2, 4), (11, 12)]], seed=3)
    kw = plan_hole_batch(_backend(hb.req_to_token, hb.pool, "spans"), hb.fb, hb.holes, "spans").plan_kwargs
    assert kw["qo_indptr"].tolist() == [0, 2, 3]
    assert kw["paged_kv_indptr"].tolist() == [0, 4, 16]
    assert kw["causal"] is True and "custom_mask" not in kw


def test_batches_without_holes_take_the_stock_path():
    hb = hole_batch([10, 7], [[(4, 10)], [(0, 7)]], seed=5)
    backend = _backend(hb.req_to_token, hb.pool, "auto")
    assert plan_hole_batch(backend, hb.fb, hb.holes, "auto") is None
    assert backend.prefill_wrappers_paged[0]._plan is None  # nothing planned
    hb.fb.forward_mode = ForwardMode.DECODE
    assert plan_hole_batch(backend, hb.fb, hb.holes, "auto") is None


def test_hole_batch_on_an_unsupported_backend_is_an_error():
    hb = hole_batch([12], [[(2, 4), (11, 12)]], seed=3)
    with pytest.raises(RuntimeError, match="cannot run it"):
        plan_hole_batch(_backend(hb.req_to_token, hb.pool, "spans", num_wrappers=2), hb.fb, hb.holes, "spans")
