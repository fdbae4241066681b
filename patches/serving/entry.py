"""Entry validation of chunk hints: ``TokenizerManager._validate_one_request`` (AFTER hook).

Runs in the tokenizer manager for ``/generate``, the OpenAI endpoints and
``Engine.generate`` alike, once the prompt is tokenized: a malformed
``sglang_holes.chunks`` action (unknown version or policy, unsorted, overlapping,
empty or out-of-range chunks, unknown fields), a server without the ``holes`` cache,
a model whose RoPE cannot be re-rotated, or the ``deviation`` policy where its probe
cannot run (architecture, tensor parallelism) raises ``ValueError``, which SGLang
answers with HTTP 400 (``Engine``: the exception); nothing reaches the scheduler.
"""

from __future__ import annotations

from typing import Any

from sglang_holes.chunks.hints import SCORED
from sglang_holes.chunks.llama_stack import check_supported
from sglang_holes.chunks.rope import RopeSpec
from sglang_holes.patches.launch.hooks import BACKEND_NAME
from sglang_holes.patches.serving.kv_hints import find_chunk_hints
from sglang_holes.patches.serving.rpc import check_token_ids


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
        # SGLang does not check this; one id past the vocabulary would take the scheduler down.
        check_token_ids(list(input_ids), manager.model_config.vocab_size)
    hints = find_chunk_hints(getattr(obj, "kv_hints", None))
    if hints is None:
        return result
    if getattr(manager.server_args, "radix_cache_backend", None) != BACKEND_NAME or \
            getattr(manager.server_args, "disable_radix_cache", False):
        raise ValueError("sglang_holes.chunks hints need the holes radix cache (--radix-cache-backend holes, "
                         "radix cache enabled)")
    hints.check_length(len(input_ids or []))
    from sglang_holes.patches.scheduler.cache_factory import HOLE_BACKENDS, quantized_kv

    if (why := quantized_kv(manager.server_args)) is not None:
        raise ValueError(f"sglang_holes.chunks hints cannot be served here: {why}")
    args = manager.server_args
    if (getattr(args, "page_size", None) or 1) != 1:
        raise ValueError("sglang_holes.chunks hints cannot be served here: chunk reuse needs --page-size 1")
    backends = {getattr(args, "attention_backend", None), getattr(args, "prefill_attention_backend", None)} - {None}
    if backends and not backends <= set(HOLE_BACKENDS):
        raise ValueError(f"sglang_holes.chunks hints cannot be served here: attention backend {sorted(backends)} "
                         f"cannot run hole batches (only {HOLE_BACKENDS})")
    if getattr(manager.model_config, "model_is_mrope", False) or \
            str(getattr(getattr(manager.model_config, "attention_arch", None), "name", "")) == "MLA":
        raise ValueError("sglang_holes.chunks hints cannot be served for this model (3-D RoPE or MLA attention)")
    hf = getattr(manager.model_config, "hf_text_config", None) or manager.model_config.hf_config
    config = hf.to_dict()
    RopeSpec.from_config(config)  # UnsupportedRopeError (a ValueError) for YaRN, dynamic NTK, ...
    if hints.policy in SCORED:
        check_supported(config, getattr(manager.server_args, "tp_size", 1))
    layers = int(config.get("num_hidden_layers") or 0)
    if hints.policy == "query" and layers and hints.layers is not None and hints.layers > layers:
        raise ValueError(f"layers must be at most the model's {layers} layers, got {hints.layers}")
    return result
