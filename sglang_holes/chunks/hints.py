"""Chunk hints: which spans of a prompt are reusable documents, and which tokens to recompute.

A RAG request marks its documents as chunks (half-open token offsets into the prompt);
each chunk's KV may come from a content-addressed store, computed at another position
(re-rotated by ``sglang_holes.chunks.rope``). Reuse without the preceding context is
approximate, so a policy picks tokens to recompute; together with every token outside
a reused chunk (question, separators, chunks not in the store) they become the holes
of one segmented prefill.

Wire format: a SGLang ``kv_hints`` action (``managers/kv_hints.py`` envelope)::

    {"action_id": "...", "action_type": "sglang_holes.chunks", "action_version": "1",
     "payload": {"chunks": [[0, 120], [120, 260]], "policy": "first_k", "k": 16}}

Policies: ``none`` (reuse every cached chunk token), ``first_k`` (recompute the first
``k`` tokens of each reused chunk: EPIC/LegoLink's attention-sink fix), ``deviation``
(recompute the ``ratio`` fraction of reused tokens whose early-layer KV deviates most
from what full context would give: CacheBlend's selection; scores come from the caller).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

ACTION_TYPE = "sglang_holes.chunks"
PROTOCOL_VERSION = "1"  # of SGLang's kv_hints envelope
VERSIONS = ("1",)
POLICIES = ("none", "first_k", "deviation")

Span = tuple[int, int]


@dataclass(frozen=True)
class ChunkHints:
    """Validated chunk hints of one prompt of ``n`` tokens (see module docstring)."""

    chunks: tuple[Span, ...]
    policy: str = "first_k"
    k: int = 16
    ratio: float = 0.15

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown chunk policy {self.policy!r}; expected one of {POLICIES}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 0:
            raise ValueError(f"k must be an integer >= 0, got {self.k!r}")
        number = isinstance(self.ratio, int | float) and not isinstance(self.ratio, bool)
        if not (number and 0.0 <= float(self.ratio) <= 1.0):
            raise ValueError(f"ratio must be a number in [0, 1], got {self.ratio!r}")
        prev = 0
        for i, (s, e) in enumerate(self.chunks):
            if s < prev:
                raise ValueError(f"chunk {i} [{s}, {e}) starts before the end of chunk {i - 1} "
                                 "(chunks must be sorted and must not overlap)")
            if e <= s:
                raise ValueError(f"chunk {i} [{s}, {e}) is empty or reversed")
            prev = e

    def check_length(self, n: int) -> None:
        """Raise ``ValueError`` unless every chunk lies inside a prompt of ``n`` tokens."""
        if self.chunks and self.chunks[-1][1] > n:
            s, e = self.chunks[-1]
            raise ValueError(f"chunk [{s}, {e}) is out of range for a prompt of {n} tokens")


def parse_chunk_action(version: str, payload: Mapping[str, Any]) -> ChunkHints:
    """The payload of a ``sglang_holes.chunks`` action -> ``ChunkHints`` (``ValueError`` if malformed)."""
    if version not in VERSIONS:
        raise ValueError(f"{ACTION_TYPE} version {version!r} is not supported (supported: {VERSIONS})")
    if not isinstance(payload, Mapping):
        raise ValueError(f"{ACTION_TYPE} payload must be an object")
    unknown = set(payload) - {"chunks", "policy", "k", "ratio"}
    if unknown:
        raise ValueError(f"{ACTION_TYPE} payload has unknown fields {sorted(unknown)}")
    raw = payload.get("chunks")
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise ValueError("chunks must be a non-empty list of [start, end) token offsets")
    chunks = []
    for c in raw:
        if (not isinstance(c, Sequence) or len(c) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in c)):
            raise ValueError(f"chunk {c!r} is not a pair of non-negative integer offsets [start, end)")
        chunks.append((int(c[0]), int(c[1])))
    return ChunkHints(tuple(chunks), payload.get("policy", "first_k"), payload.get("k", 16),
                      payload.get("ratio", 0.15))


def chunk_boundaries(lengths: Sequence[int]) -> list[Span]:
    """Half-open spans of consecutive chunks of the given token lengths."""
    out, pos = [], 0
    for n in lengths:
        out.append((pos, pos + int(n)))
        pos += int(n)
    return out


def recompute_mask(n: int, hints: ChunkHints, reused: Sequence[bool],
                   deviation: torch.Tensor | None = None, forced_from: int | None = None) -> torch.Tensor:
    """Boolean ``[n]``: True where the token is recomputed (a hole), False where chunk KV is reused.

    ``reused[i]``: chunk ``i``'s KV is available (from the store). Always recomputed: tokens
    outside reused chunks, the last token (its logits start generation) and ``[forced_from, n)``
    (positions whose input logprobs were asked for). ``deviation`` (``[n]`` scores, higher =
    deviates more) is required by the ``deviation`` policy, which recomputes
    ``round(ratio * candidates)`` of the reused tokens left after that: the count depends on
    the hints and ``reused`` only, so it is known before any score (``reused_count``).
    """
    hints.check_length(n)
    if len(reused) != len(hints.chunks):
        raise ValueError(f"reused has {len(reused)} entries for {len(hints.chunks)} chunks")
    mask = torch.ones(n, dtype=torch.bool)
    for (s, e), ok in zip(hints.chunks, reused, strict=True):
        if ok:
            mask[s:e] = False
    if hints.policy == "first_k":
        for (s, e), ok in zip(hints.chunks, reused, strict=True):
            if ok:
                mask[s : min(e, s + hints.k)] = True
    mask[min(n - 1, n - 1 if forced_from is None else max(forced_from, 0)) :] = True
    if hints.policy == "deviation":
        if deviation is None or deviation.shape != (n,):
            raise ValueError("the deviation policy needs one score per prompt token")
        candidates = (~mask).nonzero().flatten()
        take = round(hints.ratio * candidates.numel())
        if take:
            top = deviation[candidates].topk(take).indices
            mask[candidates[top]] = True
    return mask


def reused_count(n: int, hints: ChunkHints, reused: Sequence[bool], forced_from: int | None = None) -> int:
    """How many tokens ``recompute_mask`` leaves reused, before any deviation score."""
    zeros = torch.zeros(n) if hints.policy == "deviation" else None
    return int((~recompute_mask(n, hints, reused, zeros, forced_from)).sum())


def chunk_envelope(chunks: Sequence[Span], policy: str = "first_k", message_id: str = "",
                   **params: Any) -> dict[str, Any]:
    """A ``kv_hints`` envelope (JSON-ready dict) with one ``sglang_holes.chunks`` v1 action.

    ``chunks``: half-open token offsets ``[start, end)`` into the prompt; ``params``: ``k``
    (``first_k``) or ``ratio`` (``deviation``). Validated here (``ValueError``) and again by
    the server.
    """
    spans = [[int(s), int(e)] for s, e in chunks]
    payload: dict[str, Any] = {"chunks": spans, "policy": policy, **params}
    parse_chunk_action(VERSIONS[-1], payload)
    return {"protocol_version": PROTOCOL_VERSION, "message_id": message_id,
            "actions": [{"action_id": "chunks", "action_type": ACTION_TYPE, "action_version": VERSIONS[-1],
                         "payload": payload}]}


class ChunkedPrompt(NamedTuple):
    """A prompt assembled from chunks: ``input_ids`` and the ``kv_hints`` marking every chunk."""

    input_ids: list[int]
    kv_hints: dict[str, Any]
    chunks: list[Span]


def build_chunked_prompt(chunks: Sequence[str | Sequence[int]], encode: Callable[[str], list[int]],
                         prefix: Sequence[int] = (), policy: str = "first_k", **params: Any) -> ChunkedPrompt:
    """Concatenate chunks (text, encoded with ``encode`` and no special tokens, or token ids).

    ``prefix`` (e.g. the tokenizer's BOS) goes first and is not a chunk, so a document's
    tokens are the same wherever it appears. Every chunk, the question included, is
    marked: a chunk seen before is reused, the others are stored once computed.
    """
    if isinstance(chunks, str) or not chunks:
        raise ValueError("prompt_chunks must be a non-empty list of chunks (text or token-id lists)")
    ids = [int(t) for t in prefix]
    spans = []
    for i, c in enumerate(chunks):
        toks = encode(c) if isinstance(c, str) else list(c)
        if not toks or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in toks):
            raise ValueError(f"chunk {i} is empty or not text / a list of token ids")
        spans.append((len(ids), len(ids) + len(toks)))
        ids += toks
    return ChunkedPrompt(ids, chunk_envelope(spans, policy, **params), spans)
