"""Building the ``holes`` radix cache from SGLang's ``TreeCacheBuildContext`` (the registry's factory).

Decides, from the server's arguments and the model, what the cache can do: hole
batches (only with a hole-aware attention backend), cost-aware eviction constants,
Prometheus counters, and chunk mode (needs hole batches and re-rotatable RoPE).
"""

from __future__ import annotations

import logging
from typing import Any

from sglang_holes.cache.recompute_cost import RecomputeCost
from sglang_holes.chunks.rope import RopeSpec, UnsupportedRopeError
from sglang_holes.config import HolesConfig
from sglang_holes.patches.launch.server_args import refusal
from sglang_holes.patches.scheduler.chunk_reuse import ChunkReuse, probe_loader_for
from sglang_holes.patches.scheduler.radix_cache import HoleRadixCache
from sglang_holes.patches.serving.metrics import HoleMetrics

logger = logging.getLogger("sglang_holes")

HOLE_BACKENDS = ("torch_native", "flashinfer", "fa3")


def why_no_hole_batches(ctx: Any, hf: Any) -> str | None:
    """Why this server cannot run hole batches (its model or attention backend), or None if it can."""
    args = ctx.server_args
    model = ctx.model_config
    if getattr(model, "model_is_mrope", False):
        return ("3-D RoPE (mrope) models: SGLang builds mrope positions as the contiguous tail, so a hole's "
                "KV would be computed at the wrong rotation")
    if str(getattr(getattr(model, "attention_arch", None), "name", "")) == "MLA":
        return "MLA models run SGLang's MLA attention backends, which cannot run hole batches"
    backends = {getattr(args, "attention_backend", None), getattr(args, "prefill_attention_backend", None)} - {None}
    if not backends or not backends <= set(HOLE_BACKENDS):
        return f"attention backend {sorted(backends) or 'default'} cannot run hole batches (only {HOLE_BACKENDS})"
    if (getattr(args, "attn_cp_size", None) or 1) > 1:
        return "context parallelism splits a prefill by position across ranks; hole batches are not split"
    if "fa3" in backends and (why := _why_not_fa3(ctx, args)) is not None:
        return why
    if "flashinfer" in backends:
        # SGLang's FlashInfer backend needs several wrappers for these; hole batches use one.
        if hf is not None and getattr(hf, "sliding_window", None) and getattr(hf, "use_sliding_window", True):
            return "FlashInfer hole batches do not support sliding-window models yet"
        runner = getattr(getattr(ctx, "tp_worker", None), "model_runner", None)
        if getattr(runner, "sliding_window_size", None):  # the runner's window, whatever the HF config says
            return "FlashInfer hole batches do not support sliding-window attention yet"
        if getattr(ctx.model_config, "is_encoder_decoder", False):
            return "FlashInfer hole batches do not support encoder-decoder models"
        if "fp4" in str(getattr(args, "kv_cache_dtype", "")):
            return "FlashInfer hole batches do not support an FP4 KV cache"
    return None


def _why_not_fa3(ctx: Any, args: Any) -> str | None:
    """What keeps SGLang's FA3 extend from being one kernel call per layer over the batch's runs."""
    model = ctx.model_config
    if getattr(model, "is_local_attention_model", False):
        return "FA3 hole batches do not support local (chunked) attention models"
    if getattr(model, "is_encoder_decoder", False):
        return "FA3 hole batches do not support encoder-decoder models"
    if str(getattr(args, "kv_cache_dtype", None) or "auto") != "auto":
        return "FA3 hole batches do not support a quantized KV cache (its descales are per sequence)"
    return None


def factory(ctx: Any) -> HoleRadixCache:
    """``TreeCacheBuildContext`` -> ``HoleRadixCache`` (the registry's factory signature)."""
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm:
        raise ValueError("the holes radix cache does not support hybrid SWA/Mamba models yet")
    if ctx.params.is_eagle:
        raise ValueError("the holes radix cache does not support speculative decoding yet")
    if ctx.enable_hierarchical_cache:
        raise ValueError("the holes radix cache does not support --enable-hierarchical-cache")
    if (why := refusal(ctx.server_args)) is not None:
        raise ValueError(why)
    hf = getattr(ctx.model_config, "hf_text_config", None) or getattr(ctx.model_config, "hf_config", None)
    cost = None
    if hf is not None:
        try:
            cost = RecomputeCost.from_config(hf.to_dict())
        except ValueError as e:
            logger.warning("cost-aware eviction falls back to default FLOP constants: %s", e)
    args = ctx.server_args
    reason = why_no_hole_batches(ctx, hf)
    if reason is not None:
        logger.warning("holes radix cache: %s; requests with holes recompute from the first hole (correct, "
                       "slower)", reason)
    metrics = None
    if getattr(args, "enable_metrics", False):
        metrics = HoleMetrics(args.served_model_name or args.model_path)
    config = HolesConfig.build(ctx.server_args)
    return HoleRadixCache(ctx.params, config, recompute_cost=cost, hole_extend=reason is None, metrics=metrics,
                          chunks=_chunk_reuse(ctx, hf, reason, config), why_no_holes=reason)


def _chunk_reuse(ctx: Any, hf: Any, reason: str | None, holes: HolesConfig) -> ChunkReuse | None:
    """Chunk mode needs hole batches, an MHA KV pool (per-layer K/V buffers) and re-rotatable RoPE."""
    if reason is not None or hf is None or ctx.disable_radix_cache:
        return None
    config = hf.to_dict()
    if ctx.params.page_size != 1:  # requests with chunk hints are refused at entry
        logger.warning("chunk reuse disabled: it needs --page-size 1")
        return None
    if (why := quantized_kv(ctx.server_args)) is not None:  # requests with chunk hints are refused at entry
        logger.warning("chunk reuse disabled: %s", why)
        return None
    try:
        rope = RopeSpec.from_config(config, neox=_neox_style(ctx))
    except UnsupportedRopeError as e:  # requests with chunk hints are refused at entry
        logger.warning("chunk reuse disabled: %s", e)
        return None
    return ChunkReuse(ctx.params.token_to_kv_pool_allocator, rope,
                      probe_loader=probe_loader_for(ctx.tp_worker, config), store_tokens=holes.chunk_store_tokens,
                      store_policy=holes.chunk_store_policy, sink_tokens=holes.chunk_sink_tokens)


def quantized_kv(server_args: Any) -> str | None:
    """Why chunk KV cannot be re-rotated in this server's KV pool (a quantized dtype), or None."""
    dtype = str(getattr(server_args, "kv_cache_dtype", None) or "auto")
    if dtype in ("auto", "bfloat16", "bf16", "float16", "fp16", "float32"):
        return None
    return f"a quantized KV cache (--kv-cache-dtype {dtype}) cannot be re-rotated in place"


def _neox_style(ctx: Any) -> bool:
    """The served model's RoPE layout: NeoX (halves) unless its rotary embedding says interleaved."""
    model = getattr(getattr(getattr(ctx, "tp_worker", None), "model_runner", None), "model", None)
    for module in model.modules() if model is not None else ():
        style = getattr(module, "is_neox_style", None)
        if isinstance(style, bool):
            return style
    return True
