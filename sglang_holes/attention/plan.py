"""HolePlan: the once-per-batch CPU plan for segmented prefill.

A batch holds B sequences; sequence ``i`` has ``seq_lens[i]`` tokens and its KV is
missing on the half-open token spans ``holes[i] = [(s0, e0), (s1, e1), ...]``
(sorted, disjoint, non-empty, inside ``[0, seq_len)``; adjacent spans are allowed).
The missing tokens of the whole batch are compacted into one query buffer of
``m = sum of span lengths`` rows, sequences in order and spans in order;
``q_positions[r]`` is the original position of compacted row ``r``. Each query
must attend to every key of its own sequence at a position ``<= q_positions[r]``
(cached or written in this same pass), exactly as it would in a full causal prefill.

The plan is a frozen dataclass built on CPU once per batch; the attention paths
(``sglang_holes.attention.segmented``) and the FlashInfer input builders
(``HolePlan.flashinfer_inputs``) only consume it.

Units: positions, spans and lengths are in tokens; ``page_size`` is tokens per
page; FlashInfer's ``paged_kv_indptr`` counts pages and ``qo_indptr`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

Span = tuple[int, int]

FLASHINFER_PATHS = ("custom_mask", "spans")


def visibility_mask(q_pos: torch.Tensor, kv_len: int, window_left: int = -1) -> torch.Tensor:
    """Boolean ``[len(q_pos), kv_len]``: key ``j`` visible to a query at position ``p`` iff
    ``j <= p`` and, with ``window_left >= 0``, ``p - j <= window_left`` (FlashInfer's rule).
    The one statement of the rule: the plans' custom masks and the reference both use it."""
    j = torch.arange(kv_len, device=q_pos.device)[None, :]
    p = q_pos[:, None]
    keep = j <= p
    if window_left >= 0:
        keep &= (p - j) <= window_left
    return keep


def spans_from_inclusive(bounds: Sequence[int]) -> list[Span]:
    """Convert the inclusive-index form ``i0 <= i1 < i2 <= i3 < ...`` into half-open spans.

    ``bounds`` lists inclusive ``[first, last]`` pairs flattened, as in the original
    FlashInfer question: ``[i0, i1, i2, i3]`` means positions ``i0..i1`` and ``i2..i3``
    are missing. Returns ``[(i0, i1 + 1), (i2, i3 + 1)]``. Raises ``ValueError`` on an
    odd count or bounds that break ``i0 <= i1 < i2 <= i3 < ...``.
    """
    b = [int(x) for x in bounds]
    if len(b) % 2:
        raise ValueError(f"inclusive bounds need an even count (pairs first, last), got {len(b)}")
    for k in range(len(b) - 1):
        ok = b[k] <= b[k + 1] if k % 2 == 0 else b[k] < b[k + 1]
        if not ok:
            rel = "<=" if k % 2 == 0 else "<"
            raise ValueError(f"inclusive bounds must satisfy i{k} {rel} i{k + 1}: got {b[k]} and {b[k + 1]}")
    return [(b[k], b[k + 1] + 1) for k in range(0, len(b), 2)]


def spans_from_positions(positions: Sequence[int]) -> list[Span]:
    """Half-open runs of consecutive positions: ``[2, 3, 4, 9]`` -> ``[(2, 5), (9, 10)]``."""
    spans: list[Span] = []
    for p in positions:
        if spans and spans[-1][1] == p:
            spans[-1] = (spans[-1][0], p + 1)
        else:
            spans.append((p, p + 1))
    return spans


def _validate(seq_lens: Sequence[int], holes: Sequence[Sequence[Span]], page_size: int) -> None:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    if len(seq_lens) != len(holes):
        raise ValueError(f"seq_lens has {len(seq_lens)} sequences but holes has {len(holes)}")
    for i, (n, spans) in enumerate(zip(seq_lens, holes, strict=True)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"sequence {i}: seq_len must be a positive int, got {n!r}")
        prev_end = 0
        for span in spans:
            if len(span) != 2:
                raise ValueError(f"sequence {i}: span {span!r} is not a (start, end) pair")
            s, e = span
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (s, e)):
                raise ValueError(f"sequence {i}: span {span!r} has non-integer bounds")
            if e <= s:
                raise ValueError(f"sequence {i}: span [{s}, {e}) is empty or reversed")
            if s < 0 or e > n:
                raise ValueError(f"sequence {i}: span [{s}, {e}) is outside [0, {n})")
            if s < prev_end:
                raise ValueError(
                    f"sequence {i}: span [{s}, {e}) overlaps or precedes the previous span "
                    f"(spans must be sorted and disjoint)"
                )
            prev_end = e


class FlashAttnInputs(NamedTuple):
    """What FlashAttention's ``flash_attn_with_kvcache`` takes for a hole batch: one varlen query
    segment per run ``[s, e)`` (``HolePlan.runs``), ``cache_seqlens = e``.

    FlashAttention aligns its causal mask (and window) bottom-right, so query ``i`` of a run sees
    keys ``[0, s + i]``: its original position. Host tensors; the caller moves them.

    Attributes:
        run_seq: int64 ``[R]``, the batch row of each run (selects the row of the batch's page table).
        cu_seqlens_q: int32 ``[R + 1]``, compacted-query offsets per run.
        cache_seqlens: int32 ``[R]``, keys each run reads: positions ``[0, e)``.
        cu_seqlens_k: int32 ``[R + 1]``, cumulative ``cache_seqlens``.
        max_seqlen_q: the longest run, in tokens.
        max_seqlen_k: the largest ``e``, in tokens.
    """

    run_seq: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cache_seqlens: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def _merge_adjacent(spans: Sequence[Span]) -> list[Span]:
    out: list[Span] = []
    for s, e in spans:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


@dataclass(frozen=True)
class HolePlan:
    """Segmented-prefill plan for one batch (CPU tensors, built once, read-only).

    Attributes:
        seq_lens: ``B`` sequence lengths in tokens.
        holes: per sequence, its half-open missing spans as given.
        page_size: tokens per KV page (1 = token-granular slots).
        q_positions: int64 ``[m]``, original position of each compacted query.
        q_seq: int64 ``[m]``, sequence index of each compacted query.
        seq_q_indptr: int64 ``[B + 1]``, compacted-query offsets per sequence.
        runs: the spans with adjacent ones merged, as ``(seq, start, end)``;
            the span path makes one FlashInfer request per run.
    """

    seq_lens: tuple[int, ...]
    holes: tuple[tuple[Span, ...], ...]
    page_size: int
    q_positions: torch.Tensor = field(repr=False)
    q_seq: torch.Tensor = field(repr=False)
    seq_q_indptr: torch.Tensor = field(repr=False)
    runs: tuple[tuple[int, int, int], ...] = field(repr=False)

    @classmethod
    def from_holes(
        cls, seq_lens: Sequence[int], holes: Sequence[Sequence[Span]], page_size: int = 1
    ) -> HolePlan:
        """Validate and plan. ``holes[i]`` lists sequence ``i``'s half-open spans.

        Raises ``ValueError`` naming the sequence and span for unsorted, overlapping,
        empty, reversed or out-of-range spans. A sequence may have no spans (it then
        contributes no queries).
        """
        seq_lens = [int(n) if isinstance(n, torch.Tensor) else n for n in seq_lens]
        holes = [[tuple(s) for s in spans] for spans in holes]
        _validate(seq_lens, holes, page_size)
        pos: list[torch.Tensor] = []
        seq_ids: list[torch.Tensor] = []
        indptr = [0]
        runs: list[tuple[int, int, int]] = []
        for i, spans in enumerate(holes):
            count = 0
            for s, e in spans:
                pos.append(torch.arange(s, e, dtype=torch.int64))
                seq_ids.append(torch.full((e - s,), i, dtype=torch.int64))
                count += e - s
            indptr.append(indptr[-1] + count)
            runs.extend((i, s, e) for s, e in _merge_adjacent(spans))
        empty = torch.zeros(0, dtype=torch.int64)
        return cls(
            seq_lens=tuple(seq_lens),
            holes=tuple(tuple(sp) for sp in holes),
            page_size=page_size,
            q_positions=torch.cat(pos) if pos else empty,
            q_seq=torch.cat(seq_ids) if seq_ids else empty,
            seq_q_indptr=torch.tensor(indptr, dtype=torch.int64),
            runs=tuple(runs),
        )

    @property
    def num_queries(self) -> int:
        """``m``: total missing tokens of the batch (rows of the compacted query buffer)."""
        return int(self.seq_q_indptr[-1])

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    def kv_len(self, i: int) -> int:
        """Keys sequence ``i``'s queries can see: positions ``[0, end of its last span)``."""
        return self.holes[i][-1][1] if self.holes[i] else 0

    def num_queries_of(self, i: int) -> int:
        """Missing tokens of sequence ``i``."""
        return int(self.seq_q_indptr[i + 1] - self.seq_q_indptr[i])

    def positions_of(self, i: int) -> torch.Tensor:
        return self.q_positions[int(self.seq_q_indptr[i]) : int(self.seq_q_indptr[i + 1])]

    # ------------------------------------------------------------------ FlashAttention inputs

    def flash_attn_inputs(self) -> FlashAttnInputs:
        """The varlen metadata of ``flash_attn_with_kvcache`` for this plan (see ``FlashAttnInputs``).

        Pages need no planning here: the kernel reads position ``p`` of a run through its
        sequence's page-table row (``run_seq``), as SGLang's own extend does.
        """
        lengths = [e - s for _, s, e in self.runs]
        ends = [e for _, _, e in self.runs]
        i32 = torch.int32
        zero = torch.zeros(1, dtype=i32)
        return FlashAttnInputs(
            run_seq=torch.tensor([i for i, _, _ in self.runs], dtype=torch.int64),
            cu_seqlens_q=torch.cat([zero, torch.tensor(lengths, dtype=i32).cumsum(0, dtype=i32)]),
            cache_seqlens=torch.tensor(ends, dtype=i32),
            cu_seqlens_k=torch.cat([zero, torch.tensor(ends, dtype=i32).cumsum(0, dtype=i32)]),
            max_seqlen_q=max(lengths, default=0),
            max_seqlen_k=max(ends, default=0),
        )

    # ------------------------------------------------------------------ FlashInfer inputs

    def _pages(self, i: int, slots: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Page ids covering positions ``[0, kv_len)`` of sequence ``i``.

        FlashInfer's paged KV has no first-page offset: position ``p`` of a request
        must live at slot ``page[p // P] * P + p % P``. Raises ``ValueError`` when the
        slot table does not have that shape.
        """
        P = self.page_size
        slots = slots[:kv_len].to(torch.int64)
        if slots.numel() < kv_len:
            raise ValueError(f"sequence {i}: slot_table has {slots.numel()} slots, needs {kv_len}")
        pages = torch.div(slots[::P], P, rounding_mode="floor")
        if P > 1:
            expect = (pages.repeat_interleave(P)[:kv_len] * P
                      + torch.arange(kv_len, dtype=torch.int64, device=slots.device) % P)
            if not torch.equal(expect, slots):
                raise ValueError(f"sequence {i}: slot_table is not page-aligned for page_size={P}")
        return pages

    def flashinfer_inputs(
        self, path: str, slot_table: Sequence[torch.Tensor], window_left: int = -1
    ) -> dict[str, Any]:
        """Keyword arguments for ``BatchPrefillWithPagedKVCacheWrapper.plan(...)``.

        Args:
            path: ``"custom_mask"`` (one request per sequence that has holes:
                ``qo_len`` = its missing tokens, KV = positions ``[0, last_end)``,
                mask[q, j] = ``j <= pos[q]`` flattened row-major per request and
                concatenated) or ``"spans"`` (one request per run of adjacent spans:
                KV = positions ``[0, end)``, ``causal=True``, no mask; exact because
                FlashInfer aligns the causal mask bottom-right).
            slot_table: per sequence, a 1-D int tensor with the KV slot of every
                position (cached and newly written alike).
            window_left: sliding window (keys with ``pos - j <= window_left``; -1: none).
                FlashInfer applies its window bottom-right aligned, i.e. at the COMPACTED
                index under a custom mask, which is wrong for holes; so on the custom-mask
                path the window is folded into the mask and FlashInfer gets -1. On the
                span path request-local positions are original positions and FlashInfer's
                own window is exact.

        Returns the plan() keywords: ``qo_indptr``, ``paged_kv_indptr``,
        ``paged_kv_indices`` (int32, on the slot table's device), ``paged_kv_last_page_len``
        (int32, CPU), ``page_size``,
        ``causal``, ``window_left`` and, for ``custom_mask``, the boolean ``custom_mask`` (never a
        packed mask: FlashInfer 0.7.2 mis-indexes packed masks when B > 1). Head
        counts, dtypes and scales are the caller's. Sequences without holes are
        left out (they have no queries); query order is unchanged.
        """
        if len(slot_table) != self.batch_size:
            raise ValueError(f"slot_table has {len(slot_table)} rows, the plan {self.batch_size} sequences")
        if path == "custom_mask":
            reqs = [(i, self.positions_of(i), self.kv_len(i)) for i in range(self.batch_size) if self.holes[i]]
        elif path == "spans":
            reqs = [(i, torch.arange(s, e), e) for i, s, e in self.runs]
        else:
            raise ValueError(f"unknown FlashInfer path {path!r}; expected one of {FLASHINFER_PATHS}")
        P = self.page_size
        qo, kvp, indices, last, masks = [0], [0], [], [], []
        for i, pos, kv_len in reqs:
            pages = self._pages(i, slot_table[i], kv_len)
            qo.append(qo[-1] + pos.numel())
            kvp.append(kvp[-1] + pages.numel())
            indices.append(pages)
            last.append(kv_len - (pages.numel() - 1) * P)
            if path == "custom_mask":
                masks.append(visibility_mask(pos, kv_len, window_left).flatten())
        i32 = torch.int32
        out: dict[str, Any] = {
            "qo_indptr": torch.tensor(qo, dtype=i32),
            "paged_kv_indptr": torch.tensor(kvp, dtype=i32),
            "paged_kv_indices": (torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64)).to(i32),
            "paged_kv_last_page_len": torch.tensor(last, dtype=i32),
            "page_size": P,
            "causal": path == "spans",
            "window_left": window_left if path == "spans" else -1,
        }
        if path == "custom_mask":
            mask = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
            # FlashInfer 0.7.2 never checks the mask length (flashinfer#3176): check it here.
            expected = sum(p.numel() * kv for _, p, kv in reqs)
            assert mask.numel() == expected, (mask.numel(), expected)
            out["custom_mask"] = mask
        return out
