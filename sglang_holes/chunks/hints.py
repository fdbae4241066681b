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
``k`` tokens of each reused chunk: EPIC/LegoLink's attention-sink fix), and two scored
policies that recompute the ``ratio`` fraction of reused tokens with the highest score
(scores come from the caller), plus each reused chunk's first ``k`` tokens (default 0):
``deviation`` (whose early-layer KV deviates most from what full context would give:
CacheBlend's selection) and ``query`` (that the request's own computed tokens, the question,
attend to most through the first ``layers`` layers: ProphetKV / QCFuse's selection).
``explicit`` recomputes the given ``recompute`` spans (a diagnostic: the benchmark's oracle).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

ACTION_TYPE = "sglang_holes.chunks"
PROTOCOL_VERSION = "1"  # of SGLang's kv_hints envelope
VERSIONS = ("1",)
POLICIES = ("none", "first_k", "deviation", "query", "explicit")
SCORED = ("deviation", "query")  # policies whose selection needs one score per token
DEFAULT_QUERY_LAYERS = 8

Span = tuple[int, int]


@dataclass(frozen=True)
class ChunkHints:
    """Validated chunk hints of one prompt of ``n`` tokens (see module docstring)."""

    chunks: tuple[Span, ...]
    policy: str = "first_k"
    k: int | None = None  # first tokens of each reused chunk recomputed; None: 16 for first_k, else 0
    ratio: float = 0.15
    # query: layers the probe runs (scores averaged over them); None: DEFAULT_QUERY_LAYERS, or all of a
    # smaller model's. A value above the served model's layers is refused at entry, never clamped.
    layers: int | None = None
    recompute: tuple[Span, ...] = ()  # explicit: the spans recomputed

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown chunk policy {self.policy!r}; expected one of {POLICIES}")
        if self.k is None:
            object.__setattr__(self, "k", 16 if self.policy == "first_k" else 0)
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 0:
            raise ValueError(f"k must be an integer >= 0, got {self.k!r}")
        if self.layers is not None and (not isinstance(self.layers, int) or isinstance(self.layers, bool)
                                        or self.layers < 1):
            raise ValueError(f"layers must be an integer >= 1, got {self.layers!r}")
        _check_spans("recompute span", self.recompute)
        number = isinstance(self.ratio, int | float) and not isinstance(self.ratio, bool)
        if not (number and 0.0 <= float(self.ratio) <= 1.0):
            raise ValueError(f"ratio must be a number in [0, 1], got {self.ratio!r}")
        _check_spans("chunk", self.chunks)

    def check_length(self, n: int) -> None:
        """Raise ``ValueError`` unless every chunk (and recompute span) lies inside a prompt of ``n`` tokens."""
        for what, spans in (("chunk", self.chunks), ("recompute span", self.recompute)):
            if spans and spans[-1][1] > n:
                s, e = spans[-1]
                raise ValueError(f"{what} [{s}, {e}) is out of range for a prompt of {n} tokens")


def _check_spans(what: str, spans: Sequence[Span]) -> None:
    prev = 0
    for i, (s, e) in enumerate(spans):
        if s < prev:
            raise ValueError(f"{what} {i} [{s}, {e}) starts before the end of {what} {i - 1} "
                             f"({what}s must be sorted and must not overlap)")
        if e <= s:
            raise ValueError(f"{what} {i} [{s}, {e}) is empty or reversed")
        prev = e


def parse_chunk_action(version: str, payload: Mapping[str, Any]) -> ChunkHints:
    """The payload of a ``sglang_holes.chunks`` action -> ``ChunkHints`` (``ValueError`` if malformed)."""
    if version not in VERSIONS:
        raise ValueError(f"{ACTION_TYPE} version {version!r} is not supported (supported: {VERSIONS})")
    if not isinstance(payload, Mapping):
        raise ValueError(f"{ACTION_TYPE} payload must be an object")
    unknown = set(payload) - {"chunks", "policy", "k", "ratio", "layers", "recompute"}
    if unknown:
        raise ValueError(f"{ACTION_TYPE} payload has unknown fields {sorted(unknown)}")
    chunks = _parse_spans("chunks", payload.get("chunks"), allow_empty=False)
    policy = payload.get("policy", "first_k")
    if ("recompute" in payload) != (policy == "explicit"):
        raise ValueError("recompute (a list of [start, end) spans) goes with policy explicit, and only with it")
    return ChunkHints(chunks, policy, payload.get("k"), payload.get("ratio", 0.15),
                      payload.get("layers"),
                      _parse_spans("recompute", payload.get("recompute", []), allow_empty=True))


def _parse_spans(name: str, raw: Any, allow_empty: bool) -> tuple[Span, ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not (raw or allow_empty):
        raise ValueError(f"{name} must be a {'' if allow_empty else 'non-empty '}list of [start, end) token offsets")
    spans = []
    for c in raw:
        if (not isinstance(c, Sequence) or len(c) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in c)):
            raise ValueError(f"{name} entry {c!r} is not a pair of non-negative integer offsets [start, end)")
        spans.append((int(c[0]), int(c[1])))
    return tuple(spans)


def chunk_boundaries(lengths: Sequence[int]) -> list[Span]:
    """Half-open spans of consecutive chunks of the given token lengths."""
    out, pos = [], 0
    for n in lengths:
        out.append((pos, pos + int(n)))
        pos += int(n)
    return out


class Sink(NamedTuple):
    """The attention sink rule of one prompt: positions ``[0, tokens)`` are never served from KV
    computed elsewhere. ``exact[i]``: chunk ``i``'s stored KV is exact where it lies (stored at this
    offset after the same preceding tokens), so its positions inside the sink may still be reused."""

    tokens: int = 0
    exact: tuple[bool, ...] = ()


NO_SINK = Sink()  # immutable: only the bare mask arithmetic (tests, oracles) goes without the rule


def unscored_mask(n: int, hints: ChunkHints, reused: Sequence[bool], forced_from: int | None = None,
                  sink: Sink = NO_SINK) -> torch.Tensor:
    """Boolean ``[n]``: what every policy recomputes before any score (see ``recompute_mask``)."""
    hints.check_length(n)
    if len(reused) != len(hints.chunks):
        raise ValueError(f"reused has {len(reused)} entries for {len(hints.chunks)} chunks")
    exact = sink.exact or (False,) * len(hints.chunks)
    if len(exact) != len(hints.chunks):
        raise ValueError(f"sink.exact has {len(exact)} entries for {len(hints.chunks)} chunks")
    mask = torch.ones(n, dtype=torch.bool)
    for (s, e), ok, in_place in zip(hints.chunks, reused, exact, strict=True):
        if ok:
            mask[s:e] = False
            mask[s : min(e, s + hints.k)] = True
            if not in_place:
                mask[s : min(e, sink.tokens)] = True
    for s, e in hints.recompute:
        mask[s:e] = True
    mask[min(n - 1, n - 1 if forced_from is None else max(forced_from, 0)) :] = True
    return mask


def recompute_mask(n: int, hints: ChunkHints, reused: Sequence[bool],
                   scores: torch.Tensor | None = None, forced_from: int | None = None,
                   sink: Sink = NO_SINK) -> torch.Tensor:
    """Boolean ``[n]``: True where the token is recomputed (a hole), False where chunk KV is reused.

    ``reused[i]``: chunk ``i``'s KV is available (from the store). Always recomputed: tokens
    outside reused chunks, each reused chunk's first ``k`` tokens, the ``explicit`` spans, the
    last token (its logits start generation), ``[forced_from, n)`` (positions whose input
    logprobs were asked for) and the attention sink (``sink``: the first ``sink.tokens``
    positions unless their chunk is exact in place). A scored policy (``SCORED``) needs ``scores``
    (``[n]``, higher = recompute first) and recomputes ``round(ratio * candidates)`` of the reused
    tokens left after that: the count depends on the hints, ``reused`` and ``sink`` only, so it is
    known before any score (``reused_count``).
    """
    mask = unscored_mask(n, hints, reused, forced_from, sink)
    if hints.policy in SCORED:
        if scores is None or scores.shape != (n,):
            raise ValueError(f"the {hints.policy} policy needs one score per prompt token")
        candidates = (~mask).nonzero().flatten()
        take = round(hints.ratio * candidates.numel())
        if take:
            top = scores[candidates].topk(take).indices
            mask[candidates[top]] = True
    return mask


def reused_count(n: int, hints: ChunkHints, reused: Sequence[bool], forced_from: int | None = None,
                 sink: Sink = NO_SINK) -> int:
    """How many tokens ``recompute_mask`` leaves reused, before any score."""
    zeros = torch.zeros(n) if hints.policy in SCORED else None
    return int((~recompute_mask(n, hints, reused, zeros, forced_from, sink)).sum())


def chunk_envelope(chunks: Sequence[Span], policy: str = "first_k", message_id: str = "",
                   **params: Any) -> dict[str, Any]:
    """A ``kv_hints`` envelope (JSON-ready dict) with one ``sglang_holes.chunks`` v1 action.

    ``chunks``: half-open token offsets ``[start, end)`` into the prompt; ``params``: ``k``,
    ``ratio``, ``layers`` (``query``), ``recompute`` (``explicit``: spans). Validated here
    (``ValueError``) and again by the server.
    """
    spans = [[int(s), int(e)] for s, e in chunks]
    if "recompute" in params:
        params = {**params, "recompute": [[int(s), int(e)] for s, e in params["recompute"]]}
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
