"""``ChunkState``: the chunk-mode bookkeeping of one request, from its match to its release."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from sglang_holes.chunks.hints import ChunkHints
from sglang_holes.chunks.placement import ChunkFill
from sglang_holes.chunks.store import ChunkEntry


@dataclass
class ChunkState:
    """hits: per chunk, the store entry found when matched (None: computed by this request);
    base: the chunk reuse decided for those hits (None: none), kept while the request waits as
    long as the store still returns the same entries; plan: ``base`` plus the leading non-chunk
    prefix read from the exact tree (``exact_prefix`` tokens, pinned by the exact tree's
    ``prefix_node``), decided at every match, the fill in use; seeded: the lock on the exact tree's
    node holding the prefix this request computed and inserted (until release); locked: entries this request
    computed and handed to the store, locked until release; handled: chunks reused or already
    handed to the store; reused_tokens: prompt tokens taken from the store (after the policy's
    recompute and any copy an extend had to compute instead); sink_recomputed: stored positions the
    attention sink rule recomputed (``chunks.hints.Sink``)."""

    hints: ChunkHints
    namespace: Hashable
    hits: list[ChunkEntry | None]
    base: ChunkFill | None = None
    plan: ChunkFill | None = None
    exact_prefix: int = 0
    prefix_node: Any = None
    seeded: Any = None
    locked: list[ChunkEntry] = field(default_factory=list)
    handled: set[int] = field(default_factory=set)
    reused_tokens: int = 0
    sink_recomputed: int = 0
