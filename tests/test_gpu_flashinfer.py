"""The real FlashInfer kernels against the pure-torch reference (needs CUDA and flashinfer; skipped otherwise).

``benchmarks/gpu_check.py`` runs these same cases, plus the kernel benchmark, in one
process on a GPU machine (``make gpu-check``). The CPU suite checks the kernels' exact
inputs with the interpreter (``test_segmented_attention.py``).
"""

from __future__ import annotations

import pytest
import torch

from sglang_holes import HolePlan, segmented_attention
from sglang_holes.attention import KVCache, Scoring
from tests.holes_data import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="FlashInfer kernels need a CUDA GPU; the CPU suite checks their exact inputs "
                              "with the interpreter (test_segmented_attention.py)"),
]

# (seq_lens, half-open holes per sequence): holes at position 0 and at the end, several
# sequences with adjacent holes and a hole-free tail, many small holes in a long prompt.
CASES = [
    ([4096], [[(0, 16), (1000, 1001), (2000, 2128), (4000, 4096)]]),
    ([1024, 3000, 77], [[(5, 6), (500, 900)], [(0, 1), (1, 2), (2999, 3000)], [(0, 77)]]),
    ([8192], [[(k, k + 16) for k in range(100, 8192, 128)]]),
]
BACKENDS = ["custom_mask", "spans", "per_span", "auto"]
# One extra variant per path: sliding window + logits soft cap + a non-default scale, on
# CASES[1] in bf16 (logits ~ N(0, 4^2): the cap of 10 bends them, the window of 100 cuts
# most of each query's keys).
ATTN_EXTRAS = {"sm_scale": 0.35, "logits_soft_cap": 10.0, "window_left": 100}
EXTRAS_CASE = 1
# fp16/bf16 inputs and outputs vs an fp32 reference: bf16 has an 8-bit mantissa
# (2^-8 ~ 4e-3 relative per rounding), so norm-wise errors land between 1e-3 and 1e-2.
TOL = 1e-2
HQ, HKV, D = 32, 8, 128


def make_gpu_inputs(seq_lens, holes, page_size, dtype, seed, device, heads=(HQ, HKV, D)):
    """``(plan, q, k_cache, v_cache, slot_table)`` with random data made on ``device``; ``heads``: (Hq, Hkv, D).

    The same layout as ``tests.holes_data.make_batch`` (pages of each sequence drawn from
    a random permutation, two spare pages of garbage) without its float64 dense oracle,
    which would need ~50 GB of host memory for the 8192-token case; the oracle here is
    the fp32 ``reference`` path, itself checked against the dense oracle on CPU.
    """
    Hq, Hkv, D = heads
    gen = torch.Generator().manual_seed(seed)
    npages = [-(-n // page_size) for n in seq_lens]
    total_pages = sum(npages) + 2
    perm = torch.randperm(total_pages, generator=gen)
    slot_table, used = [], 0
    for n, np_ in zip(seq_lens, npages, strict=True):
        pages = perm[used : used + np_]
        used += np_
        slot_table.append((pages.repeat_interleave(page_size) * page_size
                           + torch.arange(np_ * page_size) % page_size)[:n])
    plan = HolePlan.from_holes(seq_lens, holes, page_size=page_size)
    g = torch.Generator(device=device).manual_seed(seed)
    k_cache = torch.randn(total_pages * page_size, Hkv, D, generator=g, device=device).to(dtype)
    v_cache = torch.randn(total_pages * page_size, Hkv, D, generator=g, device=device).to(dtype)
    q = torch.randn(plan.num_queries, Hq, D, generator=g, device=device).to(dtype)
    return plan, q, k_cache, v_cache, slot_table


def check_path(case, dtype, backend, page_size, attn=None, wrapper_factory=None):
    """Relative error of ``backend`` vs the fp32 reference on ``CASES[case]``."""
    seq_lens, holes = CASES[case]
    plan, q, kc, vc, slots = make_gpu_inputs(seq_lens, holes, page_size, dtype, seed=case, device="cuda")
    attn = attn or {}
    out = segmented_attention(q, KVCache(kc, vc, slots), plan, backend, wrapper_factory=wrapper_factory,
                              scoring=Scoring(**attn))
    ref = segmented_attention(q.float(), KVCache(kc.float(), vc.float(), slots), plan, "reference",
                              scoring=Scoring(**attn))
    assert out.shape == ref.shape and out.dtype == dtype
    return rel_err(out.float(), ref)


@pytest.fixture(scope="module")
def flashinfer():
    return pytest.importorskip("flashinfer")


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [1, 16])
def test_flashinfer_matches_reference(flashinfer, case, dtype, backend, page_size):
    assert check_path(case, dtype, backend, page_size) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [1, 16])
def test_window_soft_cap_scale(flashinfer, backend, page_size):
    assert check_path(EXTRAS_CASE, torch.bfloat16, backend, page_size, ATTN_EXTRAS) <= TOL
