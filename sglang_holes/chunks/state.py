"""``ChunkState``: the chunk-mode bookkeeping of one request, from admission to release."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from sglang_holes.chunks.hints import ChunkHints
from sglang_holes.chunks.store import ChunkEntry


@dataclass
class ChunkState:
    """hits: per chunk, the store entry found at admission (None: computed by this request);
    locked: entries this request holds locked; handled: chunks reused or already handed to
    the store; reused_tokens: prompt tokens taken from the store after the policy's recompute."""

    hints: ChunkHints
    namespace: Hashable
    hits: list[ChunkEntry | None]
    locked: list[ChunkEntry] = field(default_factory=list)
    handled: set[int] = field(default_factory=set)
    reused_tokens: int = 0
