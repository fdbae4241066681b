"""Cost model behind ``backend="auto"``: custom-mask vs span-batched FlashInfer prefill.

Both paths compute the same attention in ONE launch per layer; they differ in how
much work the kernel does and how much KV it streams. Per layer, with ``g = Hq/Hkv``
(GQA group), ``D`` head dim, ``b`` bytes per KV element, ``T`` the query tile
FlashInfer picks (16/64/128 rows of ``qo_len * g``, from the batch average):

custom_mask — one request per sequence, ``qo = m_i`` missing tokens, ``kv = L_i``
(end of its last hole):
    FLOPs  = 4 · Hq · D · Σ_i m_i · L_i          (every KV tile is computed; masked tiles are NOT skipped)
    bytes  = Σ_i ⌈m_i·g/T⌉ · L_i · 2·Hkv·D·b     (each query tile streams the whole KV)
           + Σ_i m_i · L_i / 8 · Hkv             (the packed mask, read per KV head)
    runs on FA2 only (a custom mask rules out FA3 on Hopper).

spans — one request per run of adjacent holes ``[a_j, e_j)``, ``s_j = e_j - a_j``,
causal (bottom-right aligned, so query ``i`` of the run sees keys ``<= a_j + i``):
    FLOPs  = 4 · Hq · D · Σ_j s_j · (a_j + (s_j + 1)/2)   (exact causal work; tiles past the frontier skipped)
    bytes  = Σ_j Σ_t (a_j + min((t+1)·T/g, s_j)) · 2·Hkv·D·b
                                                   (query tile t of run j streams the prefix and
                                                    its own keys up to the causal frontier)
    FA3-eligible (no mask), so its FLOPs run at the faster peak where FA3 exists.

Estimated time = max(FLOPs / peak, bytes / bandwidth) + per-request overhead
(L2 reuse of KV between query tiles is ignored, which overstates bytes for short KV). The
trade-off it captures: many tiny holes make the span path k decode-like passes
that each stream a long prefix (bytes dominate: one masked request reads the
prefix ⌈m·g/T⌉ times instead of k times); large holes make the span path win
(exact causal FLOPs at FA3 speed, no mask traffic, while the masked request computes
``m · L`` dense scores).

Worked example (H100 defaults below, bf16, Hq=32, Hkv=8, D=128, n = 32k):
* 100 one-token holes spread evenly over the prompt: spans streams Σ e_j ≈ 1.6M KV
  rows of 4 KB (``2·Hkv·D·b``), ~6.6 GB per layer (~2.2 ms); custom_mask streams
  ⌈100·4/128⌉·32k = 128k rows (~0.5 GB) and computes 100·32k scores (~0.2 ms):
  auto picks ``custom_mask``.
* 4 holes of 2k tokens: custom_mask computes 8k·32k dense scores at FA2 speed, spans
  about half of that at FA3 speed with no mask: auto picks ``spans``.

The constants are the model's defaults for an H100 SXM (FA2 ~ 330 TFLOP/s and FA3
~ 600 TFLOP/s effective bf16 attention, 3.0 TB/s HBM, ~4 µs per request of
scheduling overhead). They are estimates, not measurements: ``bench_attention.py``
on a GPU reports how ``auto``'s choice compares with the faster of the two paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from sglang_holes.attention.plan import HolePlan


class PathCost(NamedTuple):
    """Estimated per-layer cost of one path."""

    path: str
    flops: float
    bytes: float
    seconds: float


@dataclass(frozen=True)
class CostModel:
    """Hardware constants for the estimate (defaults: H100 SXM, bf16). Validates itself."""

    peak_fa2_flops: float = 330e12
    peak_fa3_flops: float = 600e12
    bandwidth: float = 3.0e12
    per_request_s: float = 4e-6
    fa3_available: bool = True

    def __post_init__(self) -> None:
        for name in ("peak_fa2_flops", "peak_fa3_flops", "bandwidth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CostModel.{name} must be positive")
        if self.per_request_s < 0:
            raise ValueError("CostModel.per_request_s must be >= 0")


def _tile(avg_rows: float) -> int:
    """FlashInfer FA2's query tile (CTA_TILE_Q) from the batch average of qo_len * g."""
    if avg_rows <= 16:
        return 16
    if avg_rows <= 64:
        return 64
    return 128


def _causal_rows_read(s: int, a: int, rows_per_tile: float) -> float:
    """KV rows streamed by a causal request of ``s`` queries after ``a`` cached keys."""
    nt = math.ceil(s / rows_per_tile)
    full = min(int(s // rows_per_tile), nt)
    return nt * a + rows_per_tile * full * (full + 1) / 2 + (nt - full) * s


def estimate(
    plan: HolePlan,
    path: str,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    kv_bytes: int = 2,
    model: CostModel | None = None,
) -> PathCost:
    """Estimated cost of running ``plan`` on ``path`` (``"custom_mask"`` or ``"spans"``), per layer."""
    m = model or CostModel()
    g = num_qo_heads // num_kv_heads
    row = 2 * num_kv_heads * head_dim * kv_bytes  # K and V of one token, all KV heads
    if path == "custom_mask":
        reqs = [(plan.num_queries_of(i), plan.kv_len(i)) for i in range(plan.batch_size) if plan.holes[i]]
        if not reqs:
            return PathCost(path, 0.0, 0.0, 0.0)
        T = _tile(sum(q * g for q, _ in reqs) / len(reqs))
        flops = 4.0 * num_qo_heads * head_dim * sum(q * L for q, L in reqs)
        nbytes = sum(math.ceil(q * g / T) * L * row for q, L in reqs)
        nbytes += sum(q * L / 8 * num_kv_heads for q, L in reqs)
        peak = m.peak_fa2_flops
    elif path == "spans":
        reqs = [(e - s, s, e) for _, s, e in plan.runs]
        if not reqs:
            return PathCost(path, 0.0, 0.0, 0.0)
        T = _tile(sum(s * g for s, _, _ in reqs) / len(reqs))
        flops = 4.0 * num_qo_heads * head_dim * sum(s * (a + (s + 1) / 2) for s, a, _ in reqs)
        nbytes = sum(_causal_rows_read(s, a, T / g) * row for s, a, _ in reqs)
        peak = m.peak_fa3_flops if m.fa3_available else m.peak_fa2_flops
    else:
        raise ValueError(f"no cost model for path {path!r}")
    seconds = max(flops / peak, nbytes / m.bandwidth) + m.per_request_s * len(reqs)
    return PathCost(path, flops, float(nbytes), seconds)


def choose_path(
    plan: HolePlan,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    kv_bytes: int = 2,
    model: CostModel | None = None,
) -> str:
    """The path with the lower estimated time (ties go to ``spans``: no mask memory)."""
    costs = [estimate(plan, p, num_qo_heads, num_kv_heads, head_dim, kv_bytes, model) for p in ("spans", "custom_mask")]
    return min(costs, key=lambda c: c.seconds).path
