"""Chunk reuse through SGLang's OpenAI chat endpoint (``/v1/chat/completions``).

A request body with ``chunk_reuse`` (``extra_body={"chunk_reuse": {...}}`` in the ``openai``
client) runs in chunk mode: the last user message's text content parts are the documents
(``sglang_holes.chunks.chat``). SGLang's pydantic request model drops unknown fields, so the
hooks read the field from the body FastAPI already parsed (Starlette caches it on the
request object):

* AFTER ``OpenAIServingChat._convert_to_internal_request``: replaces the prompt SGLang
  rendered with the chunked prompt (same template, exact part offsets) and attaches the
  ``kv_hints``. Malformed settings raise ``ValueError``, which SGLang answers with 400.
* AFTER ``OpenAIServingChat._build_chat_response``: ``usage.prompt_tokens_details.cached_tokens``
  = the reused prompt tokens (always, for these requests: OpenAI's own field), and
  ``metadata["chunk_reuse"]`` = the policy details (``meta_info["chunk_reuse"]`` of
  ``/generate``) plus ``recomputed_tokens``.

Streaming responses reuse the same way; their usage reports cached tokens only with
SGLang's ``--enable-cache-report``.
"""

from __future__ import annotations

from typing import Any

from sglang_holes.chunks.chat import EXTRA_FIELD, chat_chunked_prompt, parse_settings


def _body(raw_request: Any) -> dict | None:
    body = getattr(raw_request, "_json", None)  # Starlette's cache of `await request.json()`
    return body if isinstance(body, dict) else None


def after_convert_to_internal_request(result: Any, serving: Any, request: Any, raw_request: Any = None,
                                      *_: Any, **__: Any) -> Any:
    body = _body(raw_request)
    if body is None or EXTRA_FIELD not in body:
        return result
    settings = parse_settings(body[EXTRA_FIELD])
    if getattr(request, "n", 1) not in (None, 1):
        raise ValueError(f"{EXTRA_FIELD} needs n = 1")
    if getattr(request, "tools", None):
        raise ValueError(f"{EXTRA_FIELD} does not support tools")
    tok = serving.tokenizer_manager.tokenizer
    kwargs = dict(body.get("chat_template_kwargs") or {})

    def render(messages: list[dict]) -> str:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    prompt = chat_chunked_prompt(body.get("messages"), render, encode, settings)
    adapted, processed = result
    adapted.text = None
    adapted.input_ids = prompt.input_ids
    adapted.kv_hints = prompt.kv_hints
    return adapted, processed


def after_build_chat_response(response: Any, serving: Any, request: Any, ret: list, *_: Any, **__: Any) -> Any:
    from sglang.srt.entrypoints.openai.protocol import ChatCompletionResponse, PromptTokensDetails

    metas = [r.get("meta_info", {}) for r in ret]
    if not isinstance(response, ChatCompletionResponse) or not metas or EXTRA_FIELD not in metas[0]:
        return response
    response.usage.prompt_tokens_details = PromptTokensDetails(cached_tokens=sum(m.get("cached_tokens", 0)
                                                                                 for m in metas))
    details = dict(metas[0][EXTRA_FIELD], recomputed_tokens=metas[0].get("recomputed_tokens"))
    response.metadata = {**(response.metadata or {}), EXTRA_FIELD: details}
    return response
