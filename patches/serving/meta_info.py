"""Per-request ``meta_info`` fields: ``recomputed_tokens``, ``hole_spans``, ``chunk_reuse``.

They travel through SGLang's ``customized_info`` channel (scheduler -> detokenizer ->
tokenizer manager), as request-level values: the scheduler's output streamer emits
them once per request (non-streaming: with the final output; streaming: with the
first chunk), and the tokenizer manager writes them into ``meta_info``:

* ``recomputed_tokens`` (int): prompt tokens this request computed (holes + uncached tail);
* ``hole_spans`` (list of ``[start, end)`` pairs, prompt positions, ascending): the
  spans it computed. A request without holes has one span ``[cached_tokens, n)``;
* ``chunk_reuse`` (chunk-mode requests only): ``{"policy", "k" | "ratio", "chunks",
  "reused_chunks", "reused_tokens", "sink_recomputed"}`` (``sink_recomputed``: stored positions
  recomputed because they lie in the attention sink, ``chunks.hints.Sink``).

Together with SGLang's ``cached_tokens`` (every reused token, holes excluded):
``cached_tokens + recomputed_tokens == prompt_tokens``. Set only by servers running
the ``holes`` radix cache.
"""

from __future__ import annotations

from typing import Any

from sglang_holes.chunks.hints import DEFAULT_QUERY_LAYERS, SCORED

RECOMPUTED = "recomputed_tokens"
SPANS = "hole_spans"
CHUNKS = "chunk_reuse"
KEYS = (RECOMPUTED, SPANS, CHUNKS)



def record_recomputed(req: Any, spans: list[tuple[int, int]], continued: bool | None = None) -> None:
    """Record the prompt spans one extend of ``req`` computes (half-open, prompt positions).

    ``continued``: this extend continues the request's prefill (a later prefill piece), so its spans add
    to the recorded ones; False: a new prefill (a retracted request prefilled again) replaces
    them; None: decided by contiguity (a stock chunk continues the previous span).
    """
    info = req.customized_info if req.customized_info is not None else {}
    prev = info.get(SPANS)
    if prev is not None and getattr(req, "retracted_stain", False):
        # Prefilled again after a retraction: SGLang keeps the first admission's cached_tokens,
        # so the first prefill's spans stay too (cached + recomputed = prompt; spans inside it).
        return
    spans = [[s, e] for s, e in spans if e > s]
    if continued is None:
        continued = bool(prev and spans and prev[-1][1] == spans[0][0])
    if continued and prev:
        if spans and prev[-1][1] == spans[0][0]:
            prev[-1][1] = spans[0][1]
            spans = spans[1:]
        spans = prev + spans
    info[SPANS] = spans
    info[RECOMPUTED] = [sum(e - s for s, e in spans)]
    req.customized_info = info


def record_chunk_reuse(req: Any, state: Any) -> None:
    """``meta_info["chunk_reuse"]`` of a chunk-mode request: policy, chunks, chunks and tokens reused."""
    info = req.customized_info if req.customized_info is not None else {}
    hints = state.hints
    params = {"k": hints.k} if hints.policy == "first_k" or hints.k else {}
    if hints.policy in SCORED:
        params["ratio"] = hints.ratio
    if hints.policy == "query":
        params["layers"] = hints.layers if hints.layers is not None else DEFAULT_QUERY_LAYERS
    if hints.policy == "explicit":
        params["recompute"] = [list(span) for span in hints.recompute]
    if state.exact_prefix:  # the leading non-chunk prefix, read from the exact tree (exact KV)
        params["prefix_tokens"] = state.exact_prefix
    info[CHUNKS] = [{"policy": hints.policy, **params, "chunks": len(hints.chunks),
                     "reused_chunks": sum(e is not None for e in state.hits),
                     "reused_tokens": state.reused_tokens, "sink_recomputed": state.sink_recomputed}]
    req.customized_info = info


def around_is_request_level(original: Any, streamer: Any, key: str) -> bool:
    return key in KEYS or original(streamer, key)


def around_update_meta(original: Any, manager: Any, meta_info: dict, state: Any, customized_info: dict,
                        index: int, finish_reason: Any) -> None:
    ours = {k: customized_info[k][index] for k in KEYS if k in customized_info}
    rest = {k: v for k, v in customized_info.items() if k not in KEYS}
    if rest:
        original(manager, meta_info, state, rest, index, finish_reason)
    if ours.get(RECOMPUTED):  # [] for another request of the same output batch
        meta_info[RECOMPUTED] = int(ours[RECOMPUTED][0])
        meta_info[SPANS] = [list(span) for span in ours.get(SPANS, [])]
    if ours.get(CHUNKS):
        meta_info[CHUNKS] = dict(ours[CHUNKS][0])
