"""Entry validation: ``TokenizerManager._validate_one_request`` (AFTER hook) and the kv_hints batch check.

Runs in the tokenizer manager for ``/generate``, the OpenAI endpoints and
``Engine.generate`` alike, once the prompt is tokenized. Raises ``ValueError``, which SGLang
answers with HTTP 400 (``Engine``: the exception), so nothing bad reaches the scheduler:

* a token id outside the vocabulary (SGLang does not check it; it would take the scheduler down);
* a malformed ``sglang_holes.chunks`` action (unknown version or policy, unsorted, overlapping,
  empty or out-of-range chunks, unknown fields);
* RAG document hints the server cannot serve, with the reason: the server's ONE capabilities
  decision (``patches/launch/capabilities.py``, computed once per process, the same the cache
  factory reads), including the scored policies' probe (architecture, tensor parallelism).
"""

from __future__ import annotations

from typing import Any

from sglang_holes.chunks.hints import SCORED
from sglang_holes.patches.launch.capabilities import Capabilities, decide
from sglang_holes.patches.serving.kv_hints import find_chunk_hints
from sglang_holes.patches.serving.rpc import check_token_ids

CAPABILITIES_ATTR = "holes_capabilities"  # on the TokenizerManager: its Capabilities (set at start)


def after_init(result: Any, manager: Any, *_: Any, **__: Any) -> Any:
    """``TokenizerManager.__init__`` (AFTER hook): decide the server's capabilities once, at start."""
    setattr(manager, CAPABILITIES_ATTR, decide(manager.server_args, manager.model_config))
    return result


def capabilities_of(manager: Any) -> Capabilities:
    """The manager's capabilities (decided now for a manager built without ``__init__``, e.g. in tests)."""
    caps = getattr(manager, CAPABILITIES_ATTR, None)
    if not isinstance(caps, Capabilities):
        after_init(None, manager)
        caps = getattr(manager, CAPABILITIES_ATTR)
    return caps


def before_normalize_kv_hints(obj: Any, num: Any, *args: Any, **kwargs: Any) -> None:
    """A single chunk envelope on a batch would be applied to every prompt, but its offsets belong to
    one prompt: refused (``ValueError``, HTTP 400); a list of envelopes, one per prompt, is fine."""
    hints = getattr(obj, "kv_hints", None)
    if isinstance(hints, list) or getattr(obj, "batch_size", 1) <= 1:
        return None
    if find_chunk_hints(hints) is not None:
        raise ValueError("a sglang_holes.chunks kv_hints envelope describes one prompt: for a batch, pass a "
                         "list with one envelope per prompt (None for prompts without chunks)")
    return None


def after_validate(result: Any, manager: Any, obj: Any, input_ids: Any, *_: Any, **__: Any) -> Any:
    multimodal = any(getattr(obj, f, None) is not None for f in ("image_data", "video_data", "audio_data"))
    if input_ids is not None and getattr(obj, "input_embeds", None) is None and not multimodal:
        check_token_ids(list(input_ids), manager.model_config.vocab_size)
    hints = find_chunk_hints(getattr(obj, "kv_hints", None))
    if hints is None:
        return result
    caps = capabilities_of(manager)
    if caps.no_holes_cache is not None:
        raise ValueError(f"sglang_holes.chunks hints need the holes radix cache: {caps.no_holes_cache}")
    hints.check_length(len(input_ids or []))
    if caps.no_chunk_reuse is not None:
        raise ValueError(f"sglang_holes.chunks hints cannot be served here: {caps.no_chunk_reuse}")
    if hints.policy in SCORED and caps.no_probe is not None:
        raise ValueError(f"the {hints.policy} policy cannot run here: {caps.no_probe}")
    if hints.policy == "query" and caps.num_layers and hints.layers is not None and hints.layers > caps.num_layers:
        raise ValueError(f"layers must be at most the model's {caps.num_layers} layers, got {hints.layers}")
    return result
