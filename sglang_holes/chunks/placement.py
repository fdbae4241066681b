"""Where a chunk request's reusable KV comes from: the pure planning step of chunk placement.

For each chunk found in the store (``hits``), either its KV is copied into the request's
own slots with K re-rotated by the position delta (``copies``), or, at an unchanged
offset, the store's slots are read in place (borrowed, ``cached``). Which reused
positions are recomputed after all is the policy's choice (``hints.recompute_mask``);
``borrowed_writes`` then turns the reused, not-copied positions into row writes.

Units: positions ``0..n-1`` of the prompt; ``slots``: the request's allocated slots, one per position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sglang_holes.attention.plan import spans_from_positions
from sglang_holes.cache.extend_plan import RowWrite
from sglang_holes.chunks.store import ChunkEntry

Span = tuple[int, int]


@dataclass(frozen=True)
class ChunkCopy:
    """Copy the KV of store slots ``src`` into the request's ``dst``, K re-rotated by ``delta`` positions."""

    src: torch.Tensor
    dst: torch.Tensor
    delta: int


@dataclass(frozen=True)
class ChunkPlacement:
    """copies: KV copies to run before attention; cached: int64 ``[n]``, the slot holding each
    position's reusable KV once the copies ran (the request's own slot where nothing is reused);
    reused: per chunk, whether the store had it."""

    copies: tuple[ChunkCopy, ...]
    cached: torch.Tensor
    reused: tuple[bool, ...]


def plan_chunk_placement(chunks: Sequence[Span], hits: Sequence[ChunkEntry | None],
                         slots: torch.Tensor) -> ChunkPlacement:
    """Copy each hit computed at another offset; borrow each hit at its own offset. ``slots``: CPU int64 ``[n]``."""
    cached = slots.clone()
    copies = []
    for (s, e), entry in zip(chunks, hits, strict=True):
        if entry is None:
            continue
        delta = s - entry.offset
        if delta:
            copies.append(ChunkCopy(entry.slots, slots[s:e], delta))
        else:
            cached[s:e] = entry.slots
    return ChunkPlacement(tuple(copies), cached, tuple(e is not None for e in hits))


def borrowed_writes(keep: torch.Tensor, cached: torch.Tensor, slots: torch.Tensor) -> list[RowWrite]:
    """Row writes for reused positions (``~keep``) whose KV stays in the store's slots."""
    borrow = ~keep & (cached != slots)
    pos = borrow.nonzero().flatten().tolist()
    return [RowWrite(s, e, cached[s:e].clone()) for s, e in spans_from_positions(pos)]
