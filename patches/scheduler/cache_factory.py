"""Building the ``holes`` radix cache from SGLang's ``TreeCacheBuildContext`` (the registry's factory).

What the cache may do comes from the server's capabilities (``patches/launch/capabilities.py``,
the same decision entry validation reads): hole batches only with a hole-aware attention
backend, RAG document reuse only where stored KV can be re-rotated in place, the scored
policies' probe only where it runs. The factory adds what only the scheduler has: the loaded
model (its sliding window must agree with the decision, its RoPE layout), cost-aware eviction
constants and Prometheus counters.
"""

from __future__ import annotations

import logging
from typing import Any

from sglang_holes.cache.recompute_cost import RecomputeCost
from sglang_holes.chunks.rope import RopeSpec
from sglang_holes.config import HolesConfig
from sglang_holes.patches.launch.capabilities import Capabilities, check_runner, decide, text_config
from sglang_holes.patches.launch.server_args import refusal
from sglang_holes.patches.scheduler.chunk_reuse import ChunkReuse, probe_loader_for
from sglang_holes.patches.scheduler.radix_cache import HoleRadixCache
from sglang_holes.patches.serving.metrics import HoleMetrics

logger = logging.getLogger("sglang_holes")


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
    caps = decide(ctx.server_args, ctx.model_config)
    check_runner(caps, _runner(ctx))
    if caps.no_hole_batches is not None:
        logger.warning("holes radix cache: %s; requests with holes recompute from the first hole (correct, "
                       "slower)", caps.no_hole_batches)
    elif caps.no_chunk_reuse is not None:
        logger.warning("chunk reuse disabled (requests with chunk hints get HTTP 400): %s", caps.no_chunk_reuse)
    args = ctx.server_args
    metrics = HoleMetrics(args.served_model_name or args.model_path) if getattr(args, "enable_metrics", False) \
        else None
    config = HolesConfig.build(args)
    return HoleRadixCache(ctx.params, config, recompute_cost=_recompute_cost(ctx), metrics=metrics,
                          chunks=_chunk_reuse(ctx, caps, config), no_hole_batches=caps.no_hole_batches)


def _runner(ctx: Any) -> Any:
    return getattr(getattr(ctx, "tp_worker", None), "model_runner", None)


def _recompute_cost(ctx: Any) -> RecomputeCost | None:
    hf = text_config(ctx.model_config)
    if hf is None:
        return None
    try:
        return RecomputeCost.from_config(hf.to_dict())
    except ValueError as e:
        logger.warning("cost-aware eviction falls back to default FLOP constants: %s", e)
        return None


def _chunk_reuse(ctx: Any, caps: Capabilities, holes: HolesConfig) -> ChunkReuse | None:
    """The chunk store and its steps, where the capabilities allow document reuse."""
    if not caps.chunk_reuse:
        return None
    config = text_config(ctx.model_config).to_dict()
    rope = RopeSpec.from_config(config, neox=_neox_style(ctx))
    loader = probe_loader_for(ctx.tp_worker, config) if caps.no_probe is None else None
    return ChunkReuse(ctx.params.token_to_kv_pool_allocator, rope, probe_loader=loader,
                      store_tokens=holes.chunk_store_tokens, store_policy=holes.chunk_store_policy,
                      sink_tokens=holes.chunk_sink_tokens)


def _neox_style(ctx: Any) -> bool:
    """The served model's RoPE layout: NeoX (halves) unless its rotary embedding says interleaved."""
    model = getattr(_runner(ctx), "model", None)
    for module in model.modules() if model is not None else ():
        style = getattr(module, "is_neox_style", None)
        if isinstance(style, bool):
            return style
    return True
