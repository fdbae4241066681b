"""Per extend of a hole request: which of its positions this extend computes, in virtual order.

Pure planning on plain tensors (no engine, nothing mutated): the scheduler hook
(``patches/scheduler/extend.py``) plans every request of an extend batch, then applies all
the plans in one commit step.

SGLang sees a request with reused KV in *virtual order*: its ``R`` reused tokens first (the
prefix it admits: KV the tree holds, or chunk KV read in place), then its other positions
in position order (the *order*: the holes and the uncached tail; for a chunk request also
the positions whose chunk KV is copied in). Each extend SGLang schedules (the whole request,
or one piece of a prefill SGLang splits: its chunked prefill) takes the next positions of the order. Every query of an
extend sees every key at a position <= its own: reused spans, earlier extends, itself.

Units: positions and spans are token positions of the request's prompt, spans half-open
``[start, end)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sglang_holes.attention.plan import spans_from_positions
from sglang_holes.cache.node import Segment

Span = tuple[int, int]


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
class PrefillPiece:
    """One extend of a request in virtual order: the next ``len(positions)`` positions of its order.

    positions: int64 real positions this extend covers, ascending (one allocated slot each).
    query: bool ``[len(positions)]``, True where the position is computed (a query of the
        forward); False where chunk KV is copied into its slot instead (chunk requests).
    computed_before: positions of the order covered by earlier extends.
    spans: the computed spans (query positions). uncomputed: order spans still without KV
        after this extend (later pieces).
    """

    positions: torch.Tensor
    query: torch.Tensor
    computed_before: int
    spans: tuple[Span, ...]
    uncomputed: tuple[Span, ...]

    @property
    def first(self) -> bool:
        return self.computed_before == 0

    @property
    def last(self) -> bool:
        return not self.uncomputed

    @property
    def queries(self) -> torch.Tensor:
        return self.positions[self.query]

    @property
    def copies(self) -> int:
        return int((~self.query).sum())

    def computing_all(self) -> PrefillPiece:
        """This extend with every position computed (none copied): the fallback when a copy fails."""
        spans = tuple(spans_from_positions(self.positions.tolist()))
        return PrefillPiece(self.positions, torch.ones_like(self.query), self.computed_before, spans, self.uncomputed)


def plan_piece(order: torch.Tensor, computed: int, extend_len: int,
                    copied: torch.Tensor | None = None) -> PrefillPiece:
    """The extend that covers ``order[computed : computed + extend_len]`` (``ValueError`` past the end).

    ``copied``: bool ``[n]`` over prompt positions whose KV is copied in rather than computed
    (None: every position is computed). An extend needs one query (its last position's logits
    are read), so an extend that would copy every position computes its last one instead.
    """
    if computed < 0 or not 0 < extend_len <= order.numel() - computed:
        raise ValueError(f"an extend of {extend_len} positions after {computed} of {order.numel()}")
    positions = order[computed : computed + extend_len]
    query = torch.ones(extend_len, dtype=torch.bool) if copied is None else ~copied[positions]
    if not bool(query.any()):
        query[-1] = True
    rest = order[computed + extend_len :]
    return PrefillPiece(positions, query, computed, tuple(spans_from_positions(positions[query].tolist())),
                     tuple(spans_from_positions(rest.tolist())))
