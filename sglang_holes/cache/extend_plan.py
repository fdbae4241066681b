"""Per request of an extend batch: which positions reuse cached KV and which are recomputed.

Pure planning on plain tensors (no engine, nothing mutated): the scheduler hook
(``patches/schedule_batch.py``) builds one ``ExtendPlan`` per request from what stock
allocation produced, then applies all of them to the batch in one commit step.

Units: positions and spans are token positions of the request's prompt, spans
half-open ``[start, end)``. ``prefix_len`` (P0) is the leading cached run the scheduler
admitted; ``slots`` are the ``n - P0`` slots stock allocation gave positions ``P0..n-1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sglang_holes.attention.plan import spans_from_positions
from sglang_holes.cache.node import Segment

Span = tuple[int, int]


@dataclass(frozen=True)
class RowWrite:
    """Point row positions ``[start, end)`` at ``slots`` (KV owned by the tree or the chunk store)."""

    start: int
    end: int
    slots: torch.Tensor  # int64 [end - start]


@dataclass(frozen=True)
class ExtendPlan:
    """How a chunk-mode request's allocated extend is rewritten (hole requests: ``HoleChunk``).

    keep: bool ``[n - P0]`` over the allocated extend, True = position recomputed.
    positions: int64 ``[m]`` recomputed positions, ascending (the queries' original positions).
    borrowed: row spans that now point at slots the request does not own (never freed with its row).
    row_writes: what to write into the request's row for those spans.
    surplus: allocated slots of borrowed positions, which the plan does not use (to free).
    logprob_tail: the last ``logprob_tail`` recomputed positions return input logprobs.
    """

    prefix_len: int
    keep: torch.Tensor
    positions: torch.Tensor
    borrowed: tuple[Span, ...]
    row_writes: tuple[RowWrite, ...]
    surplus: torch.Tensor
    logprob_tail: int = 0

    @property
    def seq_len(self) -> int:
        return self.prefix_len + int(self.keep.numel())

    @property
    def recomputed(self) -> int:
        return int(self.positions.numel())

    @property
    def reused(self) -> int:
        return self.seq_len - self.recomputed

    @property
    def missing(self) -> list[Span]:
        """Recomputed spans: the holes and the uncached tail (the last position included)."""
        return spans_from_positions(self.positions.tolist())


def plan_extend(prefix_len: int, keep: torch.Tensor, slots: torch.Tensor,
                row_writes: Sequence[RowWrite], logprob_tail: int = 0) -> ExtendPlan:
    """The plan for an extend whose positions ``P0 + i`` are recomputed where ``keep[i]``.

    ``slots``: the allocated extend slots (any device). ``row_writes``: reused spans whose KV
    stays where it is (borrowed); they may not touch a recomputed position. A reused position
    without a row write keeps its allocated slot (chunk KV copied into it). The allocated
    slots of row-written positions are the surplus.
    """
    ext = int(keep.numel())
    if slots.numel() != ext:
        raise ValueError(f"{slots.numel()} allocated slots for an extend of {ext} tokens")
    written = torch.zeros(ext, dtype=torch.bool)
    for w in row_writes:
        if not prefix_len <= w.start < w.end <= prefix_len + ext or w.slots.numel() != w.end - w.start:
            raise ValueError(f"row write [{w.start}, {w.end}) does not fit the extend [{prefix_len}, "
                             f"{prefix_len + ext}) or its slots")
        written[w.start - prefix_len : w.end - prefix_len] = True
    if bool((written & keep).any()):
        raise ValueError("a row write covers a recomputed position")
    positions = torch.arange(prefix_len, prefix_len + ext, dtype=torch.int64)[keep]
    surplus = slots[written.to(slots.device)]
    return ExtendPlan(prefix_len, keep, positions, tuple((w.start, w.end) for w in row_writes),
                      tuple(row_writes), surplus, logprob_tail)


def missing_positions(segments: Sequence[Segment], n: int) -> torch.Tensor:
    """int64 ascending: the positions of ``[0, n)`` without cached KV (holes and the uncached tail).

    ``segments``: a match (``HoleTree.match``) of a prefix of the prompt (SGLang matches all but
    the last token); positions past the segments are missing.
    """
    cached = torch.zeros(n, dtype=torch.bool)
    for g in segments:
        if g.slots is not None:
            cached[g.start : min(g.end, n)] = True
    return (~cached).nonzero().flatten()


@dataclass(frozen=True)
class HoleChunk:
    """One extend of a hole request: the next ``len(positions)`` missing positions, in order.

    SGLang sees a hole request in *virtual order*: its ``R`` reused tokens first (the prefix it
    admitted), then its ``m`` missing tokens in position order; each extend it schedules (the
    whole request, or one chunk of a chunked prefill) takes the next missing tokens. Every query
    of a chunk sees every key at a position <= its own: reused spans, earlier chunks and itself.

    positions: int64 real positions computed by this extend, ascending.
    computed_before: missing positions computed by earlier extends.
    uncomputed: missing spans still without KV after this extend (later chunks).
    """

    positions: torch.Tensor
    computed_before: int
    spans: tuple[Span, ...]
    uncomputed: tuple[Span, ...]

    @property
    def first(self) -> bool:
        return self.computed_before == 0

    @property
    def last(self) -> bool:
        return not self.uncomputed


def plan_hole_chunk(missing: torch.Tensor, computed: int, extend_len: int) -> HoleChunk:
    """The extend that computes ``missing[computed : computed + extend_len]`` (``ValueError`` past the end)."""
    if computed < 0 or not 0 < extend_len <= missing.numel() - computed:
        raise ValueError(f"an extend of {extend_len} tokens after {computed} of {missing.numel()} missing ones")
    positions = missing[computed : computed + extend_len]
    rest = missing[computed + extend_len :]
    return HoleChunk(positions, computed, tuple(spans_from_positions(positions.tolist())),
                     tuple(spans_from_positions(rest.tolist())))
