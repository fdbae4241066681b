"""The real FlashInfer kernels against the pure-torch reference (needs CUDA; skipped otherwise)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("FlashInfer kernels need a CUDA GPU; the CPU suite checks their exact inputs "
                "with the interpreter (test_segmented_attention.py)", allow_module_level=True)

flashinfer = pytest.importorskip("flashinfer")

from sglang_holes import segmented_attention  # noqa: E402
from tests.holes_data import make_batch, rel_err  # noqa: E402

CASES = [
    ([4096], [[(0, 16), (1000, 1001), (2000, 2128), (4000, 4096)]]),
    ([1024, 3000, 77], [[(5, 6), (500, 900)], [(0, 1), (1, 2), (2999, 3000)], [(0, 77)]]),
    ([8192], [[(k, k + 16) for k in range(100, 8192, 128)]]),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["custom_mask", "spans", "per_span", "auto"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_flashinfer_matches_reference(case, dtype, backend, page_size):
    seq_lens, holes = CASES[case]
    b = make_batch(seq_lens, holes, page_size, Hq=32, Hkv=8, D=128, seed=case, dtype=dtype)
    dev = torch.device("cuda")
    q, kc, vc = b.q.to(dev), b.k_cache.to(dev), b.v_cache.to(dev)
    out = segmented_attention(q, kc, vc, b.slot_table, b.plan, backend)
    ref = segmented_attention(q.float(), kc.float(), vc.float(), b.slot_table, b.plan, "reference")
    # fp16/bf16 inputs and outputs vs an fp32 reference: bf16 has an 8-bit mantissa
    # (2^-8 ~ 4e-3 relative per rounding), so norm-wise errors land between 1e-3 and 1e-2.
    assert rel_err(out.float().cpu(), ref.cpu()) <= 1e-2
