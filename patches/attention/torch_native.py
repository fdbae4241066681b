"""Hole-aware torch_native attention backend (CPU).

Registered over ``ATTENTION_BACKENDS["torch_native"]`` in SGLang's attention-backend
registry (``patches/launch/plugin.py``); the factory returns the stock backend unless the server
runs the ``holes`` radix cache, so installing sglang-holes changes nothing for anyone else.

For an extend batch whose ``BatchHoles`` holds a fill (handed over by
``patches/attention/forward_batch.py``) each layer writes the K/V of every missing token into
its slot first, then computes attention for the compacted queries only, through
``sglang_holes.attention.sdpa`` (torch's fused SDPA with the plan's mask, tested against the
pure-torch reference; every query attends to its sequence's keys at positions <= its ORIGINAL
position, O(m·n) instead of stock torch_native's O(n²) per request). Other batches take the
stock code path unchanged.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from sglang_holes.attention.kv import KVCache, Scoring
from sglang_holes.attention.plan import HolePlan
from sglang_holes.attention.sdpa import sdpa_attention
from sglang_holes.config import HolesConfig
from sglang_holes.patches.attention.hole_backend import HoleBackend


class HoleTorchNativeAttnBackend(HoleBackend, TorchNativeAttnBackend):
    """Stock torch_native, plus one hole attention call per layer for batches with fills."""

    def __init__(self, model_runner: Any, *args: Any, config: HolesConfig | None = None, **kwargs: Any) -> None:
        super().__init__(model_runner, *args, **kwargs)
        config = config or HolesConfig()
        # prefix-only (benchmark baseline): every extend takes the hole attention code.
        self._every_extend = config.prefix_only
        self._path = config.attention_path
        self._plan: HolePlan | None = None  # this batch's, planned once in init_forward_metadata
        self._slot_table: list | None = None

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        holes = self.take(forward_batch)
        self._plan = self._slot_table = None
        if holes is not None and (holes.has_fill or self._every_extend):
            self._plan = holes.plan()
            self._slot_table = holes.slot_table(self.req_to_token_pool.req_to_token)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if self._plan is None or layer.is_cross_attention:
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        if save_kv_cache and k is not None and v is not None:
            # Every hole's K/V is written before this layer attends (exactness invariant).
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v
            )
        q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        window = getattr(layer, "sliding_window_size", None)
        scoring = Scoring(layer.scaling, layer.logit_cap if getattr(layer, "logit_cap", 0) else None,
                          window if window is not None and window > -1 else -1)
        kv = KVCache(self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                     self.token_to_kv_pool.get_value_buffer(layer.layer_id), self._slot_table)
        o = sdpa_attention(q_, kv, self._plan, scoring, self._path)
        return o.reshape(q.shape[0], layer.tp_q_head_num * layer.v_head_dim)
