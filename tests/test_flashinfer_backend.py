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
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

from sglang_holes.attention.flashinfer_interpreter import InterpretedPrefillWrapper
from sglang_holes.patches.flashinfer_backend import HoleFlashInferAttnBackend, plan_hole_batch

HQ, HKV, D, LAYERS, POOL = 4, 2, 16, 2, 512
# Each output is a softmax-weighted sum of <= 60 fp32 terms; the float64 oracle differs by
# float32 rounding, ~1e-6 relative. A wrong key, position or mask bit moves it by O(0.1).
TOL = 1e-5


class _NoGlobalScale:
    @staticmethod
    def needs_global_scale() -> bool:
        return False


def _backend(req_to_token: torch.Tensor, pool: MHATokenToKVPool, path: str, num_wrappers: int = 1):
    """SGLang's FlashInfer backend minus its CUDA workspaces, with the interpreter as its paged wrapper."""
    b = object.__new__(HoleFlashInferAttnBackend)
    b.hole_path = path
    b.page_size = 1
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


def _batch(seq_lens: list[int], missing: list[list[tuple[int, int]]], seed: int):
    """A batch as the extend hook leaves it: rows with cached + new slots, compacted positions."""
    g = torch.Generator().manual_seed(seed)
    pool = MHATokenToKVPool(POOL, 1, torch.float32, HKV, D, LAYERS, "cpu", False)
    perm = torch.randperm(POOL - 1, generator=g) + 1  # slot 0 is SGLang's padding slot
    req_to_token = torch.zeros(8, 256, dtype=torch.int32)
    rows = [5, 2, 7][: len(seq_lens)]
    k_full, v_full, positions, out_loc, used = [], [], [], [], 0
    for r, n, spans in zip(rows, seq_lens, missing, strict=True):
        slots = perm[used : used + n]
        used += n
        req_to_token[r, :n] = slots.to(torch.int32)
        kf = [torch.randn(n, HKV, D, generator=g) for _ in range(LAYERS)]
        vf = [torch.randn(n, HKV, D, generator=g) for _ in range(LAYERS)]
        k_full.append(kf)
        v_full.append(vf)
        new = torch.tensor([p for s, e in spans for p in range(s, e)], dtype=torch.int64)
        cached = torch.ones(n, dtype=torch.bool)
        cached[new] = False
        for layer in range(LAYERS):  # the cached KV, written by earlier passes
            pool.k_buffer[layer][slots[cached]] = kf[layer][cached]
            pool.v_buffer[layer][slots[cached]] = vf[layer][cached]
        positions.append(new)
        out_loc.append(slots[new])
    m = [p.numel() for p in positions]
    fb = ForwardBatch(  # SGLang's own ForwardBatch, with the fields a hole extend carries
        forward_mode=ForwardMode.EXTEND, batch_size=len(seq_lens), input_ids=torch.zeros(sum(m), dtype=torch.int64),
        req_pool_indices=torch.tensor(rows), seq_lens=torch.tensor(seq_lens), out_cache_loc=torch.cat(out_loc),
        seq_lens_sum=sum(seq_lens), seq_lens_cpu=torch.tensor(seq_lens), positions=torch.cat(positions),
        extend_seq_lens_cpu=m, extend_prefix_lens_cpu=[n - k for n, k in zip(seq_lens, m, strict=True)],
    )
    return pool, req_to_token, fb, k_full, v_full


def _oracle(q: torch.Tensor, fb, k_full, v_full, layer: int, scale: float) -> torch.Tensor:
    out, start = [], 0
    for i, m in enumerate(fb.extend_seq_lens_cpu):
        pos = fb.positions[start : start + m]
        qi = q[start : start + m].double()
        start += m
        k = k_full[i][layer].double().repeat_interleave(HQ // HKV, dim=1)
        v = v_full[i][layer].double().repeat_interleave(HQ // HKV, dim=1)
        s = torch.einsum("qhd,khd->hqk", qi, k) * scale
        s = s.masked_fill(torch.arange(k.shape[0])[None, None, :] > pos[None, :, None], float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), v))
    return torch.cat(out)


CASES = {
    "holes at 0, inside and the tail": ([37], [[(0, 3), (10, 15), (36, 37)]]),
    "mixed batch: hole request + plain extend + cold prompt": (
        [50, 30, 20], [[(20, 25), (33, 34), (49, 50)], [(12, 30)], [(0, 20)]]),
    "single-token holes": ([60, 9], [[(1, 2), (3, 4), (58, 60)], [(8, 9)]]),
}


@pytest.mark.parametrize("path", ["custom_mask", "spans", "auto"])
@pytest.mark.parametrize("case", list(CASES))
def test_sglang_forward_extend_on_hole_batches_matches_oracle(path, case):
    seq_lens, missing = CASES[case]
    pool, req_to_token, fb, k_full, v_full = _batch(seq_lens, missing, seed=len(case))
    backend = _backend(req_to_token, pool, path)
    backend.init_forward_metadata(fb)  # the subclass method: plans the hole batch, never the stock path
    meta = backend.forward_metadata
    assert isinstance(meta, PrefillMetadata) and meta.use_ragged is False
    wrapper = backend.prefill_wrappers_paged[0]
    if path != "auto":
        assert (wrapper._plan.packed_mask is not None) == (path == "custom_mask")
    scale = D**-0.5
    for layer_id in range(LAYERS):
        layer = RadixAttention(HQ, D, scale, HKV, layer_id)
        q = torch.randn(fb.positions.numel(), HQ * D)
        # the new tokens' K/V, which forward_extend writes into their slots before attending
        k = torch.cat([k_full[i][layer_id][p] for i, p in enumerate(_split(fb))])
        v = torch.cat([v_full[i][layer_id][p] for i, p in enumerate(_split(fb))])
        o = backend.forward_extend(q, k, v, layer, fb)  # SGLang's own method
        want = _oracle(q.view(-1, HQ, D), fb, k_full, v_full, layer_id, scale)
        assert (o.view(-1, HQ, D).double() - want).abs().max().item() <= TOL
        got_k = pool.k_buffer[layer_id][fb.out_cache_loc]
        assert torch.equal(got_k, k)  # every hole's KV is saved at its slot


def _split(fb) -> list[torch.Tensor]:
    out, start = [], 0
    for m in fb.extend_seq_lens_cpu:
        out.append(fb.positions[start : start + m])
        start += m
    return out


def test_plan_keywords_for_the_custom_mask_path():
    """The exact plan() inputs: one request per sequence, queries = missing tokens,
    KV = [0, seq_len), boolean mask j <= pos (FlashInfer packs it: never pre-packed)."""
    pool, req_to_token, fb, *_ = _batch([12], [[(2, 4), (11, 12)]], seed=3)
    prefill = plan_hole_batch(_backend(req_to_token, pool, "custom_mask"), fb, "custom_mask")
    kw = prefill.plan_kwargs
    assert kw["qo_indptr"].tolist() == [0, 3] and kw["paged_kv_indptr"].tolist() == [0, 12]
    assert kw["paged_kv_indices"].tolist() == req_to_token[5, :12].tolist()
    assert kw["paged_kv_last_page_len"].tolist() == [1] and kw["page_size"] == 1
    assert "packed_custom_mask" not in kw and kw["custom_mask"].dtype == torch.bool
    mask = kw["custom_mask"].view(3, 12)
    assert mask.sum(1).tolist() == [3, 4, 12]  # positions 2, 3 and 11 see keys 0..pos
    assert (kw["num_qo_heads"], kw["num_kv_heads"], kw["head_dim_qk"]) == (HQ, HKV, D)


def test_plan_keywords_for_the_span_path():
    """One causal request per run of spans: KV = [0, end), bottom-right alignment = original positions."""
    pool, req_to_token, fb, *_ = _batch([12], [[(2, 4), (11, 12)]], seed=3)
    kw = plan_hole_batch(_backend(req_to_token, pool, "spans"), fb, "spans").plan_kwargs
    assert kw["qo_indptr"].tolist() == [0, 2, 3]
    assert kw["paged_kv_indptr"].tolist() == [0, 4, 16]
    assert kw["causal"] is True and "custom_mask" not in kw


def test_batches_without_holes_take_the_stock_path():
    pool, req_to_token, fb, *_ = _batch([10, 7], [[(4, 10)], [(0, 7)]], seed=5)
    backend = _backend(req_to_token, pool, "auto")
    assert plan_hole_batch(backend, fb, "auto") is None
    assert backend.prefill_wrappers_paged[0]._plan is None  # nothing planned
    fb.forward_mode = ForwardMode.DECODE
    assert plan_hole_batch(backend, fb, "auto") is None


def test_hole_batch_on_an_unsupported_backend_is_an_error():
    pool, req_to_token, fb, *_ = _batch([12], [[(2, 4), (11, 12)]], seed=3)
    with pytest.raises(RuntimeError, match="cannot run it"):
        plan_hole_batch(_backend(req_to_token, pool, "spans", num_wrappers=2), fb, "spans")

