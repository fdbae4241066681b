"""Segmented attention: all holes of a batch in ONE attention launch per layer.

``segmented_attention(q, KVCache(k, v, slot_table), plan, backend=...)`` computes,
for the ``m`` compacted missing tokens of a batch, attention over every key of their
sequence at positions ``<=`` their ORIGINAL position. Backends:

* ``"reference"`` -- pure torch (``sglang_holes.attention.reference``), any device; the oracle.
* ``"sdpa"`` -- the same on CPU through torch's fused SDPA with the plan's mask
  (``sglang_holes.attention.sdpa``); what the hole-aware torch_native backend runs.
* ``"custom_mask"`` -- FlashInfer paged prefill, one request per sequence, custom mask
  built from original positions (``HolePlan.flashinfer_inputs("custom_mask", ...)``).
* ``"spans"`` -- FlashInfer paged prefill, one causal request per run of adjacent
  holes, no mask (exact: FlashInfer's causal mask is bottom-right aligned).
* ``"per_span"`` -- the baseline this project replaces: one FlashInfer plan and
  launch per hole.
* ``"auto"`` -- ``"sdpa"`` for CPU tensors; on CUDA the cheaper of
  ``custom_mask`` / ``spans`` by the cost model in ``sglang_holes.attention.path_cost`` (see its
  docstring for the model and a worked example).

Plan/run split: ``FlashInferHoleAttention`` owns the workspace and one FlashInfer
wrapper per path (never one wrapper re-planned across masked and unmasked plans:
0.7.2 can keep a stale mask, flashinfer#860); ``plan()`` once per batch on CPU
metadata, ``run()`` per layer. ``segmented_attention`` is the one-shot convenience.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sglang_holes.attention.kv import DEFAULT_SCORING, KVCache, Scoring
from sglang_holes.attention.path_cost import CostModel, choose_path
from sglang_holes.attention.plan import HolePlan
from sglang_holes.attention.reference import reference_attention
from sglang_holes.attention.sdpa import sdpa_attention

BACKENDS = ("reference", "sdpa", "custom_mask", "spans", "per_span", "auto")


@dataclass(frozen=True)
class AttentionParams:
    """Per-model attention settings shared by every layer's run (validated)."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    q_dtype: torch.dtype = torch.bfloat16
    kv_dtype: torch.dtype = torch.bfloat16
    sm_scale: float | None = None
    logits_soft_cap: float | None = None
    window_left: int = -1

    def __post_init__(self) -> None:
        if self.num_qo_heads < 1 or self.num_kv_heads < 1 or self.head_dim < 1:
            raise ValueError("head counts and head_dim must be positive")
        if self.num_qo_heads % self.num_kv_heads:
            raise ValueError(f"num_qo_heads ({self.num_qo_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.window_left < -1:
            raise ValueError("window_left must be -1 (no window) or >= 0")

    def plan_kwargs(self) -> dict[str, Any]:
        """plan() keywords besides the plan's own (window_left comes from ``flashinfer_inputs``)."""
        out: dict[str, Any] = {
            "num_qo_heads": self.num_qo_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim_qk": self.head_dim,
            "q_data_type": self.q_dtype,
            "kv_data_type": self.kv_dtype,
            "pos_encoding_mode": "NONE",  # RoPE is applied by the model, at original positions
        }
        if self.sm_scale is not None:
            out["sm_scale"] = self.sm_scale
        if self.logits_soft_cap is not None:
            out["logits_soft_cap"] = self.logits_soft_cap
        return out


def _default_wrapper_factory(workspace: torch.Tensor) -> Any:
    import flashinfer

    return flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")


class FlashInferHoleAttention:
    """Plan once per batch, run once per layer, for one FlashInfer path.

    Args:
        params: head counts, dtypes and scales.
        device: where the workspace lives (CUDA for the real kernels).
        wrapper_factory: builds a ``BatchPrefillWithPagedKVCacheWrapper``-like object
            from the workspace; the default is FlashInfer's. Tests pass the pure-torch
            ``InterpretedPrefillWrapper`` so the very same plan/run calls run on CPU.
        workspace_bytes: FlashInfer float workspace size.
    """

    def __init__(
        self,
        params: AttentionParams,
        device: torch.device | str = "cuda",
        wrapper_factory: Callable[[torch.Tensor], Any] | None = None,
        workspace_bytes: int = 128 << 20,
    ) -> None:
        self.params = params
        self._factory = wrapper_factory or _default_wrapper_factory
        self._workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self._wrappers: dict[str, list[Any]] = {}
        self._launches: list[tuple[int, int, Any]] | None = None  # (first q row, end q row, wrapper)
        self._page_size = 1

    def _wrapper(self, path: str, k: int) -> Any:
        pool = self._wrappers.setdefault(path, [])
        while len(pool) <= k:
            pool.append(self._factory(self._workspace))
        return pool[k]

    def plan(self, plan: HolePlan, slot_table: Sequence[torch.Tensor], path: str) -> None:
        """Build FlashInfer metadata for ``plan`` on ``path`` (``custom_mask``, ``spans`` or ``per_span``)."""
        kw = self.params.plan_kwargs()
        launches: list[tuple[int, int, Any]] = []
        if path in ("custom_mask", "spans"):
            w = self._wrapper(path, 0)
            # On the device, as SGLang's backend passes them (patches/attention/flashinfer.py): FlashInfer packs
            # a custom mask with a kernel that rejects host tensors (found on an H200).
            inputs = {k: v.to(self._workspace.device) if isinstance(v, torch.Tensor) else v
                      for k, v in plan.flashinfer_inputs(path, slot_table, self.params.window_left).items()}
            w.plan(**inputs, **kw)
            launches.append((0, plan.num_queries, w))
        elif path == "per_span":
            row, k = 0, 0
            for i, spans in enumerate(plan.holes):
                for s, e in spans:
                    single = HolePlan.from_holes([plan.seq_lens[i]], [[(s, e)]], plan.page_size)
                    w = self._wrapper(path, k)
                    w.plan(**single.flashinfer_inputs("spans", [slot_table[i]], self.params.window_left), **kw)
                    launches.append((row, row + e - s, w))
                    row, k = row + e - s, k + 1
        else:
            raise ValueError(f"unknown FlashInfer path {path!r}")
        self._launches = launches
        self._page_size = plan.page_size

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """``q [m, Hq, D]`` compacted queries; caches ``[num_slots, Hkv, D]`` -> ``[m, Hq, D]``."""
        if self._launches is None:
            raise RuntimeError("run() before plan()")
        P = self._page_size
        kv = (k_cache.view(-1, P, *k_cache.shape[1:]), v_cache.view(-1, P, *v_cache.shape[1:]))
        if out is None:
            out = torch.empty(q.shape[0], q.shape[1], v_cache.shape[-1], dtype=q.dtype, device=q.device)
        for a, b, w in self._launches:
            if b > a:
                out[a:b] = w.run(q[a:b], kv)
        return out


def resolve_backend(backend: str, q: torch.Tensor, plan: HolePlan, params: AttentionParams,
                    cost_model: CostModel | None = None) -> str:
    """The concrete backend ``auto`` stands for (``sdpa`` on CPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    if q.device.type != "cuda":
        return "sdpa"
    kv_bytes = torch.empty(0, dtype=params.kv_dtype).element_size()
    return choose_path(plan, params.num_qo_heads, params.num_kv_heads, params.head_dim, kv_bytes, cost_model)


def segmented_attention(
    q: torch.Tensor,
    kv: KVCache,
    plan: HolePlan,
    backend: str = "auto",
    *,
    scoring: Scoring = DEFAULT_SCORING,
    wrapper_factory: Callable[[torch.Tensor], Any] | None = None,
    cost_model: CostModel | None = None,
) -> torch.Tensor:
    """Attention of the compacted missing tokens of a batch, one launch per layer.

    Args:
        q: ``[m, Hq, D]`` queries of the missing tokens, in ``plan`` order
            (sequences in order, spans in order), RoPE already applied at their
            original positions.
        kv: ``KVCache``: ``k``, ``v`` ``[num_slots, Hkv, D]`` (the missing tokens' K/V already
            written to their slots; with ``page_size > 1``, ``num_slots`` is a multiple of it and
            slot ``s`` is row ``s % P`` of page ``s // P``) and ``slot_table``: per sequence, the
            1-D slot of every position ``[0, seq_len)``.
        plan: the batch's ``HolePlan``.
        backend: one of ``reference``, ``sdpa``, ``custom_mask``, ``spans``, ``per_span``, ``auto``.
        scoring: softmax scale, soft cap and sliding window (``Scoring``).
        wrapper_factory: see ``FlashInferHoleAttention`` (tests pass the interpreter).

    Returns ``[m, Hq, D]`` in ``q.dtype``.
    """
    k_cache, v_cache, slot_table = kv
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape[:2] != k_cache.shape[:2]:
        raise ValueError("expected q [m, Hq, D] and k_cache, v_cache [num_slots, Hkv, D]")
    params = AttentionParams(q.shape[1], k_cache.shape[1], q.shape[2], q.dtype, k_cache.dtype, *scoring)
    chosen = resolve_backend(backend, q, plan, params, cost_model)
    if chosen == "reference":
        return reference_attention(q, kv, plan, scoring)
    if chosen == "sdpa":
        return sdpa_attention(q, kv, plan, scoring)
    if wrapper_factory is None and q.device.type != "cuda":
        raise RuntimeError(f"backend {chosen!r} runs FlashInfer kernels and needs CUDA tensors; "
                           "use backend='sdpa', 'reference' or 'auto' on CPU")
    runner = FlashInferHoleAttention(params, q.device, wrapper_factory,
                                     workspace_bytes=(128 << 20) if q.device.type == "cuda" else 8)
    runner.plan(plan, slot_table, chosen)
    return runner.run(q, k_cache, v_cache)
