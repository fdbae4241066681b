"""Random batches with holes, and an independent dense oracle (float64, explicit mask)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from sglang_holes import HolePlan


@dataclass
class Batch:
    plan: HolePlan
    q: torch.Tensor  # [m, Hq, D] compacted, fp32
    k_cache: torch.Tensor  # [num_slots, Hkv, D]
    v_cache: torch.Tensor
    slot_table: list[torch.Tensor]
    expected: torch.Tensor  # [m, Hq, D] dense causal attention rows at the missing positions (fp64)


def dense_rows(q, k, v, rows, sm_scale=None, soft_cap=None, window_left=-1):
    """Full causal attention of one sequence in float64, by definition, at ``rows``."""
    n, Hq, D = q.shape
    g = Hq // k.shape[1]
    scale = sm_scale if sm_scale is not None else D**-0.5
    q, k, v = q.double(), k.double().repeat_interleave(g, dim=1), v.double().repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if soft_cap:
        s = soft_cap * torch.tanh(s / soft_cap)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    keep = j <= i
    if window_left >= 0:
        keep &= (i - j) <= window_left
    s = s.masked_fill(~keep, float("-inf"))
    o = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)
    return o[rows]


@st.composite
def hole_lists(draw, n: int) -> list[tuple[int, int]]:
    """Sorted disjoint spans over [0, n): runs of missing tokens, randomly split into adjacent pieces."""
    density = draw(st.sampled_from([0.05, 0.3, 0.7, 1.0]))
    missing = draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
    spans: list[tuple[int, int]] = []
    p = 0
    while p < n:
        if missing[p] < density:
            e = p
            while e < n and missing[e] < density:
                e += 1
            cuts = sorted(draw(st.sets(st.integers(p + 1, e - 1), max_size=3))) if e - p > 1 else []
            bounds = [p, *cuts, e]
            spans += list(itertools.pairwise(bounds))
            p = e
        else:
            p += 1
    return spans


@st.composite
def batches(draw, max_len: int = 40, page_sizes=(1, 2, 4, 16), dtype=torch.float32) -> Batch:
    B = draw(st.integers(1, 3))
    P = draw(st.sampled_from(page_sizes))
    Hkv = draw(st.sampled_from([1, 2, 3]))
    g = draw(st.sampled_from([1, 2, 4]))
    D = draw(st.sampled_from([8, 16, 64]))
    seq_lens = [draw(st.integers(1, max_len)) for _ in range(B)]
    holes = [draw(hole_lists(n)) for n in seq_lens]
    seed = draw(st.integers(0, 2**31 - 1))
    return make_batch(seq_lens, holes, P, Hkv * g, Hkv, D, seed, dtype)


def make_batch(seq_lens, holes, P, Hq, Hkv, D, seed, dtype=torch.float32, **dense_kw) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    npages = [-(-n // P) for n in seq_lens]
    total_pages = sum(npages) + 2  # spare pages, never read
    perm = torch.randperm(total_pages, generator=gen)
    k_cache = torch.randn(total_pages * P, Hkv, D, generator=gen).to(dtype)  # garbage where unused
    v_cache = torch.randn(total_pages * P, Hkv, D, generator=gen).to(dtype)
    slot_table, qs, expected = [], [], []
    used = 0
    for n, spans in zip(seq_lens, holes, strict=True):
        pages = perm[used : used + -(-n // P)]
        used += pages.numel()
        slots = (pages.repeat_interleave(P) * P + torch.arange(pages.numel() * P) % P)[:n]
        q = torch.randn(n, Hq, D, generator=gen).to(dtype)
        k = torch.randn(n, Hkv, D, generator=gen).to(dtype)
        v = torch.randn(n, Hkv, D, generator=gen).to(dtype)
        k_cache[slots], v_cache[slots] = k, v
        rows = torch.cat([torch.arange(s, e) for s, e in spans]) if spans else torch.zeros(0, dtype=torch.long)
        slot_table.append(slots)
        qs.append(q[rows])
        expected.append(dense_rows(q, k, v, rows, **dense_kw))
    plan = HolePlan.from_holes(seq_lens, holes, page_size=P)
    return Batch(plan, torch.cat(qs), k_cache, v_cache, slot_table, torch.cat(expected))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
