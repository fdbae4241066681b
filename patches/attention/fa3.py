"""Hole-aware FlashAttention 3 backend (the Hopper default of SGLang).

Registered over ``ATTENTION_BACKENDS["fa3"]`` by ``patches/launch/plugin.py`` (imported only when
such a backend is built: SGLang's FA3 module loads CUDA kernels at import); the factory
returns the stock backend unless the server runs the ``holes`` radix cache.

FA3's causal mask is aligned bottom-right, so a hole batch needs no mask: SGLang's own
extend metadata is built first, then its query segments are replaced by one per run of
missing tokens ``[s, e)`` with ``cache_seqlens = e`` and that sequence's page-table row
(``HolePlan.flash_attn_inputs``). Query ``i`` of the run then sees keys ``[0, s + i]``;
FA3 applies a sliding window and soft cap on the same aligned diagonal, so both stay
exact. SGLang's stock ``forward_extend`` then writes every missing token's K/V into its
slot and makes its one ``flash_attn_with_kvcache`` call per layer, for all holes of the
batch. Plain extends and cold prompts in the same batch are one run each.

Models whose FA3 extend uses more than that one call (local/chunked attention, a
separate sliding-window KV pool, cross-attention, context parallelism) or per-sequence
descales (a quantized KV cache) take the stock path (the server's capabilities,
``patches/launch/capabilities.py``); a hole batch that reaches such a backend anyway is an
error, never a silent wrong answer.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.layers.attention.flashattention_backend import FlashAttentionBackend
from sglang.srt.utils.common import get_device_capability

from sglang_holes.attention.batch_holes import BatchHoles
from sglang_holes.attention.plan import HolePlan
from sglang_holes.config import HolesConfig
from sglang_holes.patches.attention.hole_backend import HoleBackend


def _unsupported(backend: Any) -> str | None:
    """Why ``backend`` cannot run a hole batch with one call per layer, or None."""
    if backend.use_mla:
        return "MLA"
    if backend.local_attn_builder is not None:
        return "local (chunked) attention"
    if backend.use_sliding_window_kv_pool or backend.kv_index_translator.is_translating:
        return "a separate sliding-window or translated KV pool"
    if backend._kv_shard_pool is not None or backend.attn_cp_size > 1:
        return "context parallelism or a sharded KV pool"
    if backend.kv_cache_dtype_str != "auto":
        return f"a quantized KV cache ({backend.kv_cache_dtype_str}: descales are per sequence)"
    if backend.is_encoder_decoder or backend.fa_impl_ver != 3:
        return "cross-attention or FlashAttention 4"
    return None


def plan_hole_batch(backend: Any, forward_batch: Any, holes: BatchHoles | None) -> HolePlan | None:
    """Turn ``backend.forward_metadata`` (SGLang's extend metadata, built already) into the
    hole batch's; None (metadata untouched) unless ``holes`` holds a fill.

    Works with any object carrying SGLang's FA3 backend attributes, so the CPU tests run it
    inside SGLang's own backend with the kernel replaced by the interpreter.
    """
    mode = forward_batch.forward_mode
    if holes is None or not holes.has_fill or not mode.is_extend() or mode.is_target_verify() \
            or mode.is_draft_extend_v2():
        return None
    if (why := _unsupported(backend)) is not None:
        raise RuntimeError(f"a hole batch reached an FA3 backend that cannot run it ({why}): the holes radix "
                           "cache should not build one here")
    meta = backend.forward_metadata
    device = meta.page_table.device
    plan = holes.plan(page_size=backend.page_size)
    fa = plan.flash_attn_inputs()
    meta.page_table = meta.page_table[fa.run_seq.to(device, non_blocking=True)]
    meta.cu_seqlens_q = fa.cu_seqlens_q.to(device, non_blocking=True)
    meta.cache_seqlens_int32 = fa.cache_seqlens.to(device, non_blocking=True)
    meta.cu_seqlens_k = fa.cu_seqlens_k.to(device, non_blocking=True)
    meta.max_seq_len_q = fa.max_seqlen_q
    meta.max_seq_len_k = fa.max_seqlen_k
    meta.scheduler_metadata = None  # precomputed for SGLang's own segments; extend never passes it
    return plan


class HoleFlashAttentionBackend(HoleBackend, FlashAttentionBackend):
    """Stock FA3, with the extend metadata of a hole batch re-planned per run (see module docstring)."""

    def __init__(self, model_runner: Any, *args: Any, config: HolesConfig | None = None, **kwargs: Any) -> None:
        del config  # FA3 has one hole path: nothing to configure
        # SGLang's factory checks this before building FA3; this class is built instead of it.
        major, _ = get_device_capability()
        if major not in (8, 9):
            raise ValueError("FlashAttention v3 Backend requires SM>=80 and SM<=90. "
                             "Please use `--attention-backend flashinfer`.")
        super().__init__(model_runner, *args, **kwargs)

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        plan_hole_batch(self, forward_batch, self.take(forward_batch))
