"""Moving a cached chunk's KV to another position: the copy the chunk path performs.

A chunk entry holds, per layer, K (after RoPE, at positions ``[offset, offset + len)``)
and V in slots of the paged KV pool. Placing it at ``start`` re-rotates K by
``delta = start - offset`` (``sglang_holes.chunks.rope``) into the request's own slots and
copies V; with ``delta == 0`` nothing moves: the request borrows the entry's slots.

Buffers are per-layer tensors ``[num_slots, kv_heads, head_dim]`` (page size 1), the
layout of SGLang's ``MHATokenToKVPool.k_buffer`` / ``v_buffer``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sglang_holes.chunks.rope import RopeSpec, rerotate


def copy_rerotated(k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor], src: torch.Tensor,
                   dst: torch.Tensor, delta: int, spec: RopeSpec) -> None:
    """For every layer: ``K[dst] = rerotate(K[src], delta)``, ``V[dst] = V[src]``.

    ``src`` / ``dst``: int64 slot indices ``[T]`` (disjoint). The rotation runs in
    float64 and is rounded once to the buffer's dtype, so the copy matches K computed
    at the new position up to one rounding of that dtype (checked in tests at layer 0,
    where K depends on the token and its position only).
    """
    if src.numel() != dst.numel():
        raise ValueError(f"{src.numel()} source slots for {dst.numel()} destination slots")
    if src.numel() == 0:
        return
    for kb, vb in zip(k_buffers, v_buffers, strict=True):
        src_d, dst_d = src.to(kb.device), dst.to(kb.device)
        kb[dst_d] = rerotate(kb[src_d], delta, spec) if delta else kb[src_d]
        vb[dst_d] = vb[src_d]

