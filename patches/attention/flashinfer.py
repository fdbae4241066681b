"""Hole-aware FlashInfer attention backend (GPU).

Registered over ``ATTENTION_BACKENDS["flashinfer"]`` by ``patches/launch/plugin.py`` (which
imports this module only when such a backend is built: importing SGLang's FlashInfer
backend takes seconds); the factory returns the stock backend unless the server runs
the ``holes`` radix cache.

For an extend batch with holes, ``init_forward_metadata`` plans SGLang's own paged
prefill wrapper ONCE with the batch's hole metadata (``patches/attention/forward_batch.py``:
compacted queries, original positions through either a custom mask or one causal
request per span run) and sets ``PrefillMetadata(use_ragged=False)``; SGLang's stock
``forward_extend`` then writes every missing token's K/V into its slot and runs the
paged wrapper: one launch per layer for all holes of the batch. The ragged path is
never used for hole batches: it would attend to the new tokens only.

Path selection (``custom_mask`` | ``spans`` | ``auto``): ``HolesConfig.attention_path``.
Models that need several wrappers (sliding-window or cross-attention layers),
multi-item scoring and FP4 KV dequant workspaces cannot run hole batches; the radix
cache does not build hole batches for them (``patches/scheduler/radix_cache.py``), and a hole
batch that reaches such a backend anyway is an error, never a silent wrong answer.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend, PrefillMetadata

from sglang_holes.config import HolesConfig
from sglang_holes.patches.attention.forward_batch import FlashInferHolePrefill, flashinfer_hole_prefill


def plan_hole_batch(backend: FlashInferAttnBackend, forward_batch: Any, path: str) -> FlashInferHolePrefill | None:
    """Plan ``backend.prefill_wrappers_paged[0]`` for a hole batch; None (nothing planned) without holes.

    Works with any object carrying SGLang's FlashInfer backend attributes, so the CPU
    tests run it against the pure-torch wrapper interpreter.
    """
    mode = forward_batch.forward_mode
    if not mode.is_extend() or mode.is_target_verify():
        return None
    up = backend.indices_updater_prefill
    # Page size 1 whatever the server's: SGLang plans its paged wrapper with token slots and hands
    # it the pool's [slots, H, D] buffers, which FlashInfer reads as pages of one token.
    prefill = flashinfer_hole_prefill(
        forward_batch, backend.req_to_token_pool.req_to_token, path, up.num_qo_heads, up.num_kv_heads,
        up.head_dim, up.q_data_type, up.data_type, forward_batch.seq_lens.device, page_size=1)
    if prefill is None:
        return None
    if backend.num_wrappers != 1 or backend.prefill_uses_dequant_workspace or backend.enable_mis:
        raise RuntimeError("a hole batch reached a FlashInfer backend that cannot run it (several wrappers, "
                           "multi-item scoring or FP4 dequant): the holes radix cache should not build one here")
    backend.prefill_wrappers_paged[0].begin_forward(**prefill.plan_kwargs)
    backend.forward_metadata = PrefillMetadata(backend.prefill_wrappers_paged, use_ragged=False,
                                               extend_no_prefix=False)
    return prefill


class HoleFlashInferAttnBackend(FlashInferAttnBackend):
    """Stock FlashInfer, plus one paged-prefill plan per hole batch (see module docstring)."""

    def __init__(self, model_runner: Any, *args: Any, config: HolesConfig | None = None, **kwargs: Any) -> None:
        self.hole_path = (config or HolesConfig()).attention_path
        super().__init__(model_runner, *args, **kwargs)
        # SGLang runs its KV-format access check for its own class only (``__class__ is``): run it here.
        if model_runner.prefill_attention_backend_str == "flashinfer":
            self._check_kv_attention_access("prefill", self.prefill_kv_access)
        if model_runner.decode_attention_backend_str == "flashinfer":
            self._check_kv_attention_access("decode", self.decode_kv_access)

    def init_forward_metadata(self, forward_batch: Any) -> None:
        if plan_hole_batch(self, forward_batch, self.hole_path) is None:
            super().init_forward_metadata(forward_batch)

