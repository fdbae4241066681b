"""``RequestHoles``: everything sglang-holes keeps on one scheduler ``Req``, as ONE attribute.

``req.holes`` is created on first use; each field is written by one step and consumed
(cleared) by the next, so a request that is retracted and scheduled again starts clean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sglang_holes.cache.node import Segment
from sglang_holes.chunks.hints import ChunkHints
from sglang_holes.chunks.state import ChunkState
from sglang_holes.patches.kv_hints import find_chunk_hints

ATTR = "holes"


@dataclass
class HoleFill:
    """A hole request from its match to the end of its prefill (possibly several chunks).

    SGLang is shown ``reused`` (R, every cached token of the match) as the request's prefix,
    so admission, chunking and allocation count only the missing tokens; see
    ``sglang_holes.cache.extend_plan.HoleChunk`` for the virtual order this implies.

    prefix_len: P0, the leading cached run (the tree owns row ``[0, P0)``: SGLang's
        ``cache_protected_len``). node: the deepest cached node, locked by admission (pins
        every reused span until the fill's last checkpoint). missing / row: set by the first
        extend: the missing positions, and the request's row in real position order (reused
        and computed slots; 0, a padding slot, where nothing is computed yet), on the row's device.
    """

    prefix_len: int
    reused: int
    segments: tuple[Segment, ...]
    node: Any
    missing: torch.Tensor | None = None
    row: torch.Tensor | None = None
    computed: int = 0

    @property
    def virtual_prefix(self) -> int:
        """The prefix SGLang tracks for this request: reused plus computed tokens."""
        return self.reused + self.computed


@dataclass
class RequestHoles:
    """fill: set by ``match_prefix`` when KV exists beyond a hole; cleared when the prefill is
    complete or the request is released. fallback: set by ``match_prefix`` when a request with
    KV beyond a hole cannot take the hole path (counted once, when it is scheduled). chunk:
    chunk-mode state (admission to release). ``chunk_hints`` is parsed once from ``req.kv_hints``."""

    chunk_hints: ChunkHints | None
    fill: HoleFill | None = None
    fallback: bool = False
    chunk: ChunkState | None = None


def holes_of(req: Any) -> RequestHoles:
    """The request's record (created on first use, chunk hints parsed then; validated at entry)."""
    rec = getattr(req, ATTR, None)
    if rec is None:
        rec = RequestHoles(find_chunk_hints(getattr(req, "kv_hints", None)))
        setattr(req, ATTR, rec)
    return rec
