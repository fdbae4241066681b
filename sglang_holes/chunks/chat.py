"""A chat request whose documents are content parts -> a chunked prompt (the OpenAI chat path).

RAG clients send ``/v1/chat/completions`` with one ``{"type": "text", "text": ...}`` content
part per document in the last user message, and ``chunk_reuse`` settings in the request
body. Each part becomes one chunk, so the parts must map to exact token offsets of the
rendered chat template. They do by construction: the template is rendered once with a
marker in place of each part (parts joined by ``SEPARATOR``), and the prompt is the token
concatenation ``encode(head) + encode(part_0) + encode(SEPARATOR) + encode(part_1) + ... +
encode(tail)``, each piece tokenized alone (no special tokens added). A document's tokens
are then the same wherever it appears, and ``decode(input_ids)`` is the template rendered
with the parts in place (checked by the tests). A template that rewrites the content around
the markers (anything but inserting it) is refused rather than guessed.

``chunk_reuse`` = ``{"policy": ..., "ratio": ..., "k": ..., "layers": ...}``: the fields of the
``sglang_holes.chunks`` kv_hints action except ``chunks``, validated the same way.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sglang_holes.chunks.hints import ChunkedPrompt, chunk_envelope, parse_chunk_action

EXTRA_FIELD = "chunk_reuse"  # the request-body field (openai: extra_body={"chunk_reuse": {...}})
SEPARATOR = "\n\n"  # between two parts of one message, as rendered
SETTINGS = ("policy", "ratio", "k", "layers")


def parse_settings(raw: Any) -> dict[str, Any]:
    """``chunk_reuse`` from a request body -> the action's payload fields (``ValueError`` if malformed)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f'{EXTRA_FIELD} must be an object such as {{"policy": "query", "ratio": 0.15}}')
    unknown = sorted(set(raw) - set(SETTINGS))
    if unknown:
        raise ValueError(f"{EXTRA_FIELD} has unknown fields {unknown}; allowed: {list(SETTINGS)}")
    settings = dict(raw)
    if settings.get("policy") == "explicit":
        raise ValueError(f"{EXTRA_FIELD}: the explicit policy is for kv_hints on /generate only")
    parse_chunk_action("1", {"chunks": [[0, 1]], **settings})  # the same validation as kv_hints
    return settings


def _parts(content: Any) -> list[str] | None:
    """The texts of a list of text content parts, or None if ``content`` is not one."""
    if not isinstance(content, list) or not content:
        return None
    if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return None
    return [p["text"] for p in content]


def chat_chunked_prompt(messages: Sequence[Mapping[str, Any]], render: Callable[[list[dict]], str],
                        encode: Callable[[str], list[int]], settings: Mapping[str, Any]) -> ChunkedPrompt:
    """The chunked prompt of a chat request (see module docstring).

    ``render(messages) -> str``: the chat template (with the generation prompt); ``encode``:
    text -> token ids without special tokens added. The documents are the content parts of
    the last user message; every other message must have string content. ``ValueError``
    names what is wrong.
    """
    if not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list")
    users = [i for i, m in enumerate(messages) if isinstance(m, Mapping) and m.get("role") == "user"]
    target = users[-1] if users else None
    parts = _parts(messages[target].get("content")) if target is not None else None
    if not parts or not all(parts):
        raise ValueError(f"{EXTRA_FIELD} needs the last user message's content as a list of non-empty "
                         '{"type": "text", "text": ...} parts, one per document')
    for i, m in enumerate(messages):
        if i != target and not isinstance(m.get("content"), str | None):
            raise ValueError(f"with {EXTRA_FIELD}, only the last user message may have content parts "
                             f"(message {i} has {type(m.get('content')).__name__} content)")
    nonce = uuid.uuid4().hex
    markers = [f"<<sglang-holes part {j} {nonce}>>" for j in range(len(parts))]
    marked = [dict(m) for m in messages]
    marked[target]["content"] = SEPARATOR.join(markers)
    text = render(marked)
    pieces, rest = [], text
    for marker in markers:
        if rest.count(marker) != 1:
            raise ValueError(f"the chat template does not render each content part once; {EXTRA_FIELD} cannot map "
                             "the parts to token offsets")
        before, rest = rest.split(marker)
        pieces.append(before)
    if any(sep != SEPARATOR for sep in pieces[1:]):
        raise ValueError(f"the chat template rewrites message content; {EXTRA_FIELD} cannot map the parts to "
                         "token offsets")
    ids = encode(pieces[0])
    spans = []
    for j, part in enumerate(parts):
        if j:
            ids += encode(SEPARATOR)
        toks = encode(part)
        spans.append((len(ids), len(ids) + len(toks)))
        ids += toks
    ids += encode(rest)
    return ChunkedPrompt(ids, chunk_envelope(spans, **settings), spans)
