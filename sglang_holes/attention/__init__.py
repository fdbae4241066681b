"""Kernel layer: the once-per-batch ``HolePlan`` and attention for the compacted missing tokens.

* ``batch_holes`` -- ``BatchHoles``: one extend batch's queries at their original positions, built once.
* ``kv`` -- ``KVCache`` / ``Scoring``: the argument groups every attention entry point takes.
* ``plan`` -- ``HolePlan`` (validated, frozen, CPU) and its FlashInfer ``plan()`` inputs.
* ``segmented`` -- ``segmented_attention`` / ``FlashInferHoleAttention`` (plan once, run per layer).
* ``path_cost`` -- the hardware cost model that picks FlashInfer's ``custom_mask`` or ``spans`` path.
* ``reference`` / ``sdpa`` -- the pure-torch oracle and the CPU fast path next to it.
* ``flashinfer_interpreter`` -- FlashInfer's documented plan()/run() semantics in pure torch,
  so the exact tensors the GPU kernels receive are checked on CPU.
* ``flash_attn_interpreter`` -- the same for FlashAttention 3's ``flash_attn_with_kvcache``
  (paged, varlen, bottom-right causal), fed by ``HolePlan.flash_attn_inputs``.
"""

from __future__ import annotations

from sglang_holes.attention.batch_holes import BatchHoles
from sglang_holes.attention.kv import KVCache, Scoring
from sglang_holes.attention.path_cost import CostModel, choose_path
from sglang_holes.attention.plan import HolePlan, spans_from_inclusive, spans_from_positions
from sglang_holes.attention.segmented import AttentionParams, FlashInferHoleAttention, segmented_attention

__all__ = [
    "AttentionParams",
    "BatchHoles",
    "CostModel",
    "FlashInferHoleAttention",
    "HolePlan",
    "KVCache",
    "Scoring",
    "choose_path",
    "segmented_attention",
    "spans_from_inclusive",
    "spans_from_positions",
]
