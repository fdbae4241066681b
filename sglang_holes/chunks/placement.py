"""Where a chunk request's reusable KV comes from: the pure planning step of chunk placement.

Decided when the request is matched, before SGLang admits it. For each chunk found in the
store (``hits``), each reused position either reads the store's slot in place (the chunk
sits at the offset it was computed at: *borrowed*) or gets a copy of it in one of the
request's own slots with K re-rotated by the position delta (*copied*). The policy's
recompute mask (``hints.recompute_mask``) says which positions are computed instead.

SGLang is shown the request in virtual order (``patches/scheduler/request_holes.HoleFill``): the
borrowed positions as its prefix, then the others (copies and recomputed positions) in
position order as its extend; each extend copies its copied positions before the forward
and computes the rest (``sglang_holes.cache.extend_plan.plan_piece``).

Units: positions ``0..n-1`` of the prompt; slots are KV-pool slot indices (int64, CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sglang_holes.attention.plan import spans_from_positions
from sglang_holes.cache.node import Segment
from sglang_holes.chunks.store import ChunkEntry

Span = tuple[int, int]


@dataclass(frozen=True)
class ChunkFill:
    """A chunk request's reuse over its ``n`` prompt positions.

    recompute: bool ``[n]``, True where the request computes the position.
    src: int64 ``[n]``, the store slot holding a reused position's KV (-1 where recomputed).
    delta: int64 ``[n]``, the position's offset minus the one its KV was computed at (0 where
        recomputed; 0 on a reused position: read in place).
    """

    recompute: torch.Tensor
    src: torch.Tensor
    delta: torch.Tensor

    @property
    def borrowed(self) -> torch.Tensor:
        """bool ``[n]``: reused in place (the store's slot goes into the request's row)."""
        return ~self.recompute & (self.delta == 0)

    @property
    def copied(self) -> torch.Tensor:
        """bool ``[n]``: reused through a re-rotated copy into the request's own slot."""
        return ~self.recompute & (self.delta != 0)

    @property
    def order(self) -> torch.Tensor:
        """int64, ascending: the extend positions (copied or recomputed), SGLang's extend in virtual order."""
        return (~self.borrowed).nonzero().flatten()

    @property
    def reused(self) -> int:
        return int((~self.recompute).sum())

    @classmethod
    def computing_all(cls, n: int, device: torch.device | str = "cpu") -> ChunkFill:
        """A fill that reuses nothing (every position computed), e.g. before ``with_prefix``."""
        return cls(torch.ones(n, dtype=torch.bool), torch.full((n,), -1, dtype=torch.int64, device=device),
                   torch.zeros(n, dtype=torch.int64))

    def with_prefix(self, prefix: Segment) -> ChunkFill:
        """This fill with ``[0, prefix.end)`` read in place from ``prefix.slots`` (the exact tree's KV
        of a shared leading non-chunk prefix, e.g. a system prompt). The positions must be ones this
        fill computes (no chunk covers them)."""
        p = prefix.end
        if prefix.start != 0 or prefix.slots is None or prefix.slots.numel() != p or not bool(self.recompute[:p].all()):
            raise ValueError(f"a prefix [0, {p}) must be computed positions with {p} slots")
        recompute, src, delta = self.recompute.clone(), self.src.clone(), self.delta.clone()
        recompute[:p] = False
        src[:p] = prefix.slots.to(src.device, torch.int64)
        delta[:p] = 0
        return ChunkFill(recompute, src, delta)

    def segments(self) -> tuple[Segment, ...]:
        """The borrowed spans with their store slots (the prefix SGLang admits, in position order)."""
        pos = self.borrowed.nonzero().flatten().tolist()
        return tuple(Segment(s, e, self.src[s:e].clone()) for s, e in spans_from_positions(pos))


def plan_chunk_fill(chunks: Sequence[Span], hits: Sequence[ChunkEntry | None], recompute: torch.Tensor
                    ) -> ChunkFill:
    """The fill for chunk ``i`` at ``chunks[i]`` reusing ``hits[i]`` (None: not stored), ``recompute`` bool ``[n]``."""
    n = int(recompute.numel())
    device = next((e.slots.device for e in hits if e is not None), torch.device("cpu"))
    src = torch.full((n,), -1, dtype=torch.int64, device=device)  # slot ids stay on the pool's device
    delta = torch.zeros(n, dtype=torch.int64)
    covered = torch.zeros(n, dtype=torch.bool)
    for (s, e), entry in zip(chunks, hits, strict=True):
        if entry is None:
            continue
        if len(entry) != e - s:
            raise ValueError(f"chunk [{s}, {e}) matched a stored entry of {len(entry)} tokens")
        src[s:e] = entry.slots.to(torch.int64)
        delta[s:e] = s - entry.offset
        covered[s:e] = True
    if bool((~recompute & ~covered).any()):
        raise ValueError("a position outside every stored chunk is marked reused")
    src.masked_fill_(recompute.to(device), -1)  # not boolean indexing: that would sync a GPU
    delta[recompute] = 0
    return ChunkFill(recompute.clone(), src, delta)
