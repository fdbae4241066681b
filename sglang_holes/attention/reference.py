"""Pure-torch reference for segmented prefill (any device, fp32 accumulation).

This is the oracle every fast path is checked against (the CPU engine runs the same
definition through torch's fused SDPA, ``sglang_holes.attention.sdpa``). It gathers each
sequence's keys ``[0, kv_len)`` through its slot table and masks by ORIGINAL query
position, so it is exact for any set of holes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from sglang_holes.attention.kv import DEFAULT_SCORING, KVCache, Scoring
from sglang_holes.attention.plan import HolePlan, visibility_mask


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    sm_scale: float,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """Attention of ``q [M, Hq, D]`` over ``k, v [L, Hkv, D]`` with mask ``keep [M, L]``.

    GQA: ``Hq`` must be a multiple of ``Hkv``; query head ``h`` reads KV head
    ``h // (Hq // Hkv)``. Computed in fp32, returned in ``q.dtype``. A query row
    with no visible key returns zeros (never happens for a valid plan).
    """
    M, Hq, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    g = Hq // Hkv
    qf = q.float().view(M, Hkv, g, D)
    s = torch.einsum("mkgd,lkd->kgml", qf, k.float()) * sm_scale  # [Hkv, g, M, L]
    if logits_soft_cap is not None and logits_soft_cap > 0:
        s = logits_soft_cap * torch.tanh(s / logits_soft_cap)
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    o = torch.einsum("kgml,lkd->mkgd", p, v.float())
    return o.reshape(M, Hq, v.shape[-1]).to(q.dtype)


def reference_attention(q: torch.Tensor, kv: KVCache, plan: HolePlan,
                        scoring: Scoring = DEFAULT_SCORING) -> torch.Tensor:
    """Segmented attention by definition: ``[m, Hq, D]`` compacted queries in, ``[m, Hq, D]`` out.

    ``kv``: the pool (``[num_slots, Hkv, D]``) and the slot of every position of each sequence;
    the K/V of the missing tokens must already be written to their slots (each layer writes
    before it attends).
    """
    if q.shape[0] != plan.num_queries:
        raise ValueError(f"q has {q.shape[0]} rows but the plan has {plan.num_queries} missing tokens")
    scale = scoring.sm_scale if scoring.sm_scale is not None else q.shape[-1] ** -0.5
    out = torch.empty(q.shape[0], q.shape[1], kv.v.shape[-1], dtype=q.dtype, device=q.device)
    for view in sequence_views(plan, kv.slot_table, scoring.window_left, kv.k.device):
        a, b, slots = view.a, view.b, view.slots
        out[a:b] = masked_attention(q[a:b], kv.k[slots], kv.v[slots], view.keep, scale, scoring.logits_soft_cap)
    return out


class SequenceView(NamedTuple):
    """One sequence of a plan: its query rows ``[a, b)`` and their original ``positions``,
    key slots ``[kv_len]``, visibility mask ``[b - a, kv_len]``."""

    a: int
    b: int
    positions: torch.Tensor
    slots: torch.Tensor
    keep: torch.Tensor


def sequence_views(plan: HolePlan, slot_table: Sequence[torch.Tensor], window_left: int,
                   device: torch.device) -> Iterator[SequenceView]:
    """The sequences of ``plan`` that have queries, with their key slots and visibility mask."""
    for i in range(plan.batch_size):
        a, b = int(plan.seq_q_indptr[i]), int(plan.seq_q_indptr[i + 1])
        if a == b:
            continue
        L = plan.kv_len(i)
        slots = slot_table[i][:L].to(device=device, dtype=torch.int64)
        pos = plan.positions_of(i).to(device)
        yield SequenceView(a, b, pos, slots, visibility_mask(pos, L, window_left))
