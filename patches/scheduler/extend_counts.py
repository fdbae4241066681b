"""What one extend of a request reports: ``meta_info`` spans and the cache's counters.

Called by the extend hook's commit step (``patches/scheduler/extend.py``) once per request and
prefill piece. ``cached + recomputed == prompt`` holds for every request: SGLang counts the
admitted prefix as cached, and stored document KV copied into a request's slots counts as
cached too. A request prefilled again after a retraction (``retracted_stain``) is not counted again.
"""

from __future__ import annotations

from typing import Any

from sglang_holes.attention.plan import spans_from_positions
from sglang_holes.cache.extend_plan import PrefillPiece
from sglang_holes.patches.scheduler.request_holes import HoleFill, holes_of
from sglang_holes.patches.serving.meta_info import record_chunk_reuse, record_recomputed


def record_stock_extend(cache: Any, req: Any, prefix_len: int, extend_len: int) -> None:
    """A stock extend computes ``[prefix_len, prefix_len + extend_len)``; a RAG request that reuses no
    stored document reports its ``chunk_reuse`` at its first piece."""
    record_recomputed(req, [(prefix_len, prefix_len + extend_len)])
    st = holes_of(req).chunk
    if st is not None and not prefix_len and cache.chunks is not None:
        record_chunk_reuse(req, st)


def count_extend(cache: Any, req: Any, piece: PrefillPiece) -> None:
    """``meta_info`` spans and counters of one committed piece of a fill."""
    fill = holes_of(req).fill
    record_recomputed(req, list(piece.spans), continued=not piece.first)
    stained = getattr(req, "retracted_stain", False)  # a re-prefill after a retraction is not a new request
    if fill.chunk is not None:
        _count_document_piece(cache, req, fill, piece, stained)
    elif not stained:
        _count_hole_piece(cache, fill, piece, len(req.full_untruncated_fill_ids))


def _count_hole_piece(cache: Any, fill: HoleFill, piece: PrefillPiece, n: int) -> None:
    if piece.first:
        cache.count("hole_requests")
        cache.count("reused_tokens", fill.reused)
    cache.count("recomputed_tokens", int(piece.positions.numel()))
    if piece.last:
        cache.count("hole_spans_filled", sum(1 for _, e in spans_from_positions(fill.order.tolist()) if e < n))


def _count_document_piece(cache: Any, req: Any, fill: HoleFill, piece: PrefillPiece, stained: bool) -> None:
    """SGLang counted the in-place prefix as cached; the copies count too (cached + recomputed = prompt)."""
    st = holes_of(req).chunk
    from_store = fill.chunk.reused - st.exact_prefix  # the exact tree's prefix is not document reuse
    if piece.first:
        cache.chunks.committed(req, from_store)
    forced = int((fill.chunk.copied[piece.positions] & piece.query).sum())  # a copy computed instead
    st.reused_tokens -= forced
    if not stained:
        req.cached_tokens += piece.copies
        if piece.first:
            cache.count("chunk_requests")
        cache.count("chunk_reused_tokens", (from_store - int(fill.chunk.copied.sum()) if piece.first else 0)
                    + piece.copies)
    record_chunk_reuse(req, st)
