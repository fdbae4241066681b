"""``RequestHoles``: everything sglang-holes keeps on one scheduler ``Req``, as ONE attribute.

``req.holes`` is created on first use; each field is written by one step and consumed
(cleared) by the next, so a request that is retracted and scheduled again starts clean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sglang_holes.cache.node import Segment
from sglang_holes.chunks.hints import ChunkHints
from sglang_holes.chunks.state import ChunkState
from sglang_holes.patches.kv_hints import find_chunk_hints

ATTR = "holes"


@dataclass(frozen=True)
class HoleMatch:
    """What ``match_prefix`` found beyond a hole: the admitted prefix ``P0`` and every segment."""

    prefix_len: int
    segments: tuple[Segment, ...]


@dataclass
class RequestHoles:
    """match: set by ``match_prefix`` when KV exists beyond a hole, taken by the extend hook.
    fallback: set by ``match_prefix`` when pinning that KV would leave too little room
    (counted once, when the request is scheduled). chunk: chunk-mode state (admission to
    release). ``chunk_hints`` is parsed once from ``req.kv_hints``."""

    chunk_hints: ChunkHints | None
    match: HoleMatch | None = None
    fallback: bool = False
    chunk: ChunkState | None = None


def holes_of(req: Any) -> RequestHoles:
    """The request's record (created on first use, chunk hints parsed then; validated at entry)."""
    rec = getattr(req, ATTR, None)
    if rec is None:
        rec = RequestHoles(find_chunk_hints(getattr(req, "kv_hints", None)))
        setattr(req, ATTR, rec)
    return rec
