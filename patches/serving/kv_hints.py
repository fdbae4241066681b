"""The ``sglang_holes.chunks`` action of a request's ``kv_hints`` envelope (SGLang's ``managers/kv_hints.py``)."""

from __future__ import annotations

from typing import Any

from sglang.srt.managers.kv_hints import decode_kv_hints_envelope

from sglang_holes.chunks.hints import ACTION_TYPE, PROTOCOL_VERSION, ChunkHints, parse_chunk_action


def find_chunk_hints(kv_hints: Any) -> ChunkHints | None:
    """The chunk hints of an envelope (dict or ``KvHintsEnvelope``), None without our action.

    ``ValueError`` with a message for a malformed envelope, more than one chunk action,
    or a malformed payload (``sglang_holes.chunks.parse_chunk_action``).
    """
    if not kv_hints:
        return None
    env = decode_kv_hints_envelope(kv_hints)
    ours = [a for a in env.actions if a.action_type == ACTION_TYPE]
    if not ours:
        return None
    if env.protocol_version != PROTOCOL_VERSION:
        raise ValueError(f"kv_hints protocol_version {env.protocol_version!r} is not supported with a "
                         f"{ACTION_TYPE} action (supported: {PROTOCOL_VERSION!r})")
    if len(ours) > 1:
        raise ValueError(f"kv_hints has {len(ours)} {ACTION_TYPE} actions; one request takes one")
    return parse_chunk_action(ours[0].action_version, ours[0].payload)

