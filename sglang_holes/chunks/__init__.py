"""Chunk layer (RAG): document KV reused at any position.

* ``hints`` -- the ``sglang_holes.chunks`` kv_hints action, ``ChunkHints``, recompute sets.
* ``store`` -- ``ChunkStore``: content-addressed chunk KV per namespace, locks, what it keeps (frequency or LRU).
* ``rope`` / ``kv_copy`` -- re-rotating stored K by a position delta while copying it.
* ``deviation`` -- the layer-1 KV deviation probe (CacheBlend-style selection).

The public request-building API is re-exported here (``sglang_holes.chunks.build_chunked_prompt``).
"""

from __future__ import annotations

from sglang_holes.chunks.hints import (
    ACTION_TYPE,
    POLICIES,
    ChunkedPrompt,
    ChunkHints,
    build_chunked_prompt,
    chunk_boundaries,
    chunk_envelope,
    parse_chunk_action,
    recompute_mask,
)

__all__ = [
    "ACTION_TYPE",
    "POLICIES",
    "ChunkHints",
    "ChunkedPrompt",
    "build_chunked_prompt",
    "chunk_boundaries",
    "chunk_envelope",
    "parse_chunk_action",
    "recompute_mask",
]
