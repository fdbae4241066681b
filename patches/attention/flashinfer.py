"""Hole-aware FlashInfer attention backend (GPU), and the plan() inputs of a hole batch.

Registered over ``ATTENTION_BACKENDS["flashinfer"]`` by ``patches/launch/plugin.py`` (which
imports this module only when such a backend is built: importing SGLang's FlashInfer
backend takes seconds); the factory returns the stock backend unless the server runs
the ``holes`` radix cache.

For an extend batch whose ``BatchHoles`` holds a fill, ``init_forward_metadata`` plans
SGLang's own paged prefill wrapper ONCE with the batch's hole metadata (compacted queries,
original positions through either a custom mask or one causal request per span run) and
sets ``PrefillMetadata(use_ragged=False)``; SGLang's stock ``forward_extend`` then writes
every missing token's K/V into its slot and runs the paged wrapper: one launch per layer for
all holes of the batch. The ragged path is never used for hole batches: it would attend to
the new tokens only. Everything up to the wrapper's ``plan()`` runs on CPU, so the metadata
of a hole batch is tested without a GPU (``tests/test_flashinfer_backend.py``).

Path selection (``custom_mask`` | ``spans`` | ``auto``): ``HolesConfig.attention_path``.
Models that need several wrappers (sliding-window or cross-attention layers),
multi-item scoring and FP4 KV dequant workspaces cannot run hole batches; the server's
capabilities (``patches/launch/capabilities.py``) keep the cache from building hole batches
for them, and a hole batch that reaches such a backend anyway is an error, never a silent
wrong answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend, PrefillMetadata

from sglang_holes.attention.batch_holes import BatchHoles
from sglang_holes.attention.path_cost import choose_path
from sglang_holes.attention.plan import HolePlan
from sglang_holes.config import HolesConfig
from sglang_holes.patches.attention.hole_backend import HoleBackend


class PrefillShape(NamedTuple):
    """Head counts and dtypes of the paged prefill (SGLang's ``indices_updater_prefill`` carries them)."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    q_data_type: torch.dtype
    kv_data_type: torch.dtype


@dataclass(frozen=True)
class FlashInferHolePrefill:
    """What a hole batch hands to ``BatchPrefillWithPagedKVCacheWrapper.plan`` (built once per batch).

    ``plan_kwargs`` are ``HolePlan.flashinfer_inputs`` (int32 indptrs/indices on the device;
    ``custom_mask`` as booleans, never pre-packed) plus head counts and dtypes.
    """

    plan: HolePlan
    path: str
    plan_kwargs: dict[str, Any]


def flashinfer_hole_prefill(holes: BatchHoles, req_to_token: torch.Tensor, path: str, shape: PrefillShape,
                            device: torch.device | str) -> FlashInferHolePrefill:
    """The paged-prefill plan of a hole batch, with token slots (page size 1).

    ``path`` is ``custom_mask``, ``spans`` or ``auto`` (``sglang_holes.attention.path_cost.choose_path``).
    Sliding windows are not handled here: a model with one takes the stock path.
    """
    plan = holes.plan(page_size=1)
    if path == "auto":
        kv_bytes = torch.empty((), dtype=shape.kv_data_type).element_size()
        path = choose_path(plan, shape.num_qo_heads, shape.num_kv_heads, shape.head_dim, kv_bytes=kv_bytes)
    kwargs = plan.flashinfer_inputs(path, holes.slot_table(req_to_token))
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    kwargs.update(num_qo_heads=shape.num_qo_heads, num_kv_heads=shape.num_kv_heads, head_dim_qk=shape.head_dim,
                  q_data_type=shape.q_data_type, kv_data_type=shape.kv_data_type)
    return FlashInferHolePrefill(plan, path, kwargs)


def plan_hole_batch(backend: FlashInferAttnBackend, forward_batch: Any, holes: BatchHoles | None,
                    path: str) -> FlashInferHolePrefill | None:
    """Plan ``backend.prefill_wrappers_paged[0]`` for a hole batch; None (nothing planned) unless
    ``holes`` holds a fill.

    Works with any object carrying SGLang's FlashInfer backend attributes, so the CPU
    tests run it against the pure-torch wrapper interpreter.
    """
    mode = forward_batch.forward_mode
    if holes is None or not holes.has_fill or not mode.is_extend() or mode.is_target_verify():
        return None
    if backend.num_wrappers != 1 or backend.prefill_uses_dequant_workspace or backend.enable_mis:
        raise RuntimeError("a hole batch reached a FlashInfer backend that cannot run it (several wrappers, "
                           "multi-item scoring or FP4 dequant): the holes radix cache should not build one here")
    up = backend.indices_updater_prefill
    # Page size 1 whatever the server's: SGLang plans its paged wrapper with token slots and hands
    # it the pool's [slots, H, D] buffers, which FlashInfer reads as pages of one token.
    shape = PrefillShape(up.num_qo_heads, up.num_kv_heads, up.head_dim, up.q_data_type, up.data_type)
    prefill = flashinfer_hole_prefill(holes, backend.req_to_token_pool.req_to_token, path, shape,
                                      forward_batch.seq_lens.device)
    backend.prefill_wrappers_paged[0].begin_forward(**prefill.plan_kwargs)
    backend.forward_metadata = PrefillMetadata(backend.prefill_wrappers_paged, use_ragged=False,
                                               extend_no_prefix=False)
    return prefill


class HoleFlashInferAttnBackend(HoleBackend, FlashInferAttnBackend):
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
        if plan_hole_batch(self, forward_batch, self.take(forward_batch), self.hole_path) is None:
            super().init_forward_metadata(forward_batch)
