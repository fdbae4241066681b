"""Hole batches as SGLang's attention backends receive them, and their float64 oracle.

Shared by the backend tests (``test_flashinfer_backend.py``, ``test_fa3_backend.py``): a
real ``MHATokenToKVPool`` holding each sequence's cached KV in scattered, page-aligned
slots, and SGLang's own ``ForwardBatch`` with the fields a hole extend carries
(compacted queries at their original positions, ``out_cache_loc`` = the missing slots).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

from sglang_holes.attention.batch_holes import BatchHoles

HQ, HKV, D, LAYERS, POOL = 4, 2, 16, 2, 1024
ROWS = (5, 2, 7)  # req_to_token rows of the batch's sequences (out of order on purpose)

# Each output is a softmax-weighted sum of <= 64 fp32 terms; the float64 oracle differs by
# float32 rounding, ~1e-6 relative. A wrong key, position or mask bit moves it by O(0.1).
TOL = 1e-5

# (seq_lens, missing spans per sequence): holes at 0, inside and at the tail; batches mixing
# hole requests with plain extends (one span ending at seq_len) and cold prompts ([0, n)).
CASES = {
    "holes at 0, inside and the tail": ([37], [[(0, 3), (10, 15), (36, 37)]]),
    "mixed batch: hole request + plain extend + cold prompt": (
        [50, 30, 20], [[(20, 25), (33, 34), (49, 50)], [(12, 30)], [(0, 20)]]),
    "single-token holes": ([60, 9], [[(1, 2), (3, 4), (58, 60)], [(8, 9)]]),
}


@dataclass
class HoleBatch:
    pool: MHATokenToKVPool
    req_to_token: torch.Tensor
    fb: ForwardBatch
    holes: BatchHoles  # what the extend hook's commit step hands to the forward and the backend
    k_full: list[list[torch.Tensor]]  # [sequence][layer] -> [n, HKV, D]: every position's K
    v_full: list[list[torch.Tensor]]

    def positions_of(self) -> list[torch.Tensor]:
        """The missing positions of each sequence (the compacted queries, in order)."""
        out, start = [], 0
        for m in self.fb.extend_seq_lens_cpu:
            out.append(self.fb.positions[start : start + m])
            start += m
        return out

    def new_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The missing tokens' K/V, which ``forward_extend`` writes into their slots."""
        pos = self.positions_of()
        k = torch.cat([self.k_full[i][layer][p] for i, p in enumerate(pos)])
        v = torch.cat([self.v_full[i][layer][p] for i, p in enumerate(pos)])
        return k, v


def hole_batch(seq_lens: list[int], missing: list[list[tuple[int, int]]], seed: int, page_size: int = 1) -> HoleBatch:
    """Rows whose cached positions hold KV written by earlier passes, at page-aligned random slots."""
    g = torch.Generator().manual_seed(seed)
    pool = MHATokenToKVPool(POOL, page_size, torch.float32, HKV, D, LAYERS, "cpu", False)
    pages = torch.randperm(POOL // page_size - 1, generator=g) + 1  # page 0 holds SGLang's padding slot
    req_to_token = torch.zeros(8, 256, dtype=torch.int32)
    k_full, v_full, positions, out_loc, used = [], [], [], [], 0
    for r, n, spans in zip(ROWS, seq_lens, missing, strict=False):
        need = -(-n // page_size)
        mine = pages[used : used + need]
        used += need
        slots = (mine[:, None] * page_size + torch.arange(page_size)).flatten()[:n]
        req_to_token[r, :n] = slots.to(torch.int32)
        kf = [torch.randn(n, HKV, D, generator=g) for _ in range(LAYERS)]
        vf = [torch.randn(n, HKV, D, generator=g) for _ in range(LAYERS)]
        k_full.append(kf)
        v_full.append(vf)
        new = torch.tensor([p for s, e in spans for p in range(s, e)], dtype=torch.int64)
        cached = torch.ones(n, dtype=torch.bool)
        cached[new] = False
        for layer in range(LAYERS):
            pool.k_buffer[layer][slots[cached]] = kf[layer][cached]
            pool.v_buffer[layer][slots[cached]] = vf[layer][cached]
        positions.append(new)
        out_loc.append(slots[new])
    m = [p.numel() for p in positions]
    rows = list(ROWS[: len(seq_lens)])
    fb = ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=len(seq_lens), input_ids=torch.zeros(sum(m), dtype=torch.int64),
        req_pool_indices=torch.tensor(rows), seq_lens=torch.tensor(seq_lens), out_cache_loc=torch.cat(out_loc),
        seq_lens_sum=sum(seq_lens), seq_lens_cpu=torch.tensor(seq_lens), positions=torch.cat(positions),
        extend_seq_lens_cpu=m, extend_prefix_lens_cpu=[n - k for n, k in zip(seq_lens, m, strict=True)],
        extend_seq_lens=torch.tensor(m, dtype=torch.int32),
        extend_prefix_lens=torch.tensor([n - k for n, k in zip(seq_lens, m, strict=True)], dtype=torch.int32),
    )
    # A request is a fill unless its queries are its plain tail (the commit step's rule: a stock extend).
    fills = sum(spans != [(n - k, n)] for n, k, spans in zip(seq_lens, m, missing, strict=True))
    holes = BatchHoles.build(rows, seq_lens, positions, fills)
    return HoleBatch(pool, req_to_token, fb, holes, k_full, v_full)


def oracle(batch: HoleBatch, q: torch.Tensor, layer: int, scale: float, window_left: int = -1,
           soft_cap: float = 0.0) -> torch.Tensor:
    """float64 attention of each query over its sequence's keys ``j <= pos`` (and ``pos - j <= window_left``)."""
    out, start = [], 0
    for i, pos in enumerate(batch.positions_of()):
        qi = q[start : start + pos.numel()].double()
        start += pos.numel()
        k = batch.k_full[i][layer].double().repeat_interleave(HQ // HKV, dim=1)
        v = batch.v_full[i][layer].double().repeat_interleave(HQ // HKV, dim=1)
        s = torch.einsum("qhd,khd->hqk", qi, k) * scale
        if soft_cap > 0:
            s = soft_cap * torch.tanh(s / soft_cap)
        j = torch.arange(k.shape[0])[None, None, :]
        hide = j > pos[None, :, None]
        if window_left >= 0:
            hide |= pos[None, :, None] - j > window_left
        out.append(torch.einsum("hqk,khd->qhd", s.masked_fill(hide, float("-inf")).softmax(-1), v))
    return torch.cat(out)
