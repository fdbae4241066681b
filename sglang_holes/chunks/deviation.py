"""Deviation scores for the ``deviation`` chunk policy (CacheBlend-style selection).

Definition. A reused chunk's KV was computed without the context that now precedes
it. At layer 0 that changes nothing: layer-0 K and V depend only on the token and its
position (re-rotation makes them exact). The first KV that differs is layer 1's: it
is a projection of layer 0's output, and layer-0 attention now sees the whole prompt.
The deviation of token ``t`` is

    dev(t) = ||K1_full(t) - K1_cached(t)||² + ||V1_full(t) - V1_cached(t)||²

where ``K1_full``/``V1_full`` are layer 1's K (after RoPE) and V with full context and
``K1_cached``/``V1_cached`` are what the placed chunk KV holds at layer 1. The policy
recomputes the ``ratio`` fraction of reused tokens with the largest ``dev``.

How it is computed: two passes. Pass 1 is the probe (``chunks/llama_stack.LlamaStack``,
two layers): embedding, layer 0 in full (causal attention over all ``n`` prompt tokens,
MLP) and layer 1's K/V projections, on the scheduler from the served model's own weights:
about ``2/L`` of a full prefill for an ``L``-layer model. Pass 2 is the one segmented prefill over the selected
tokens and every token no chunk covers. CacheBlend instead recomputes layer 1 for
all tokens inside the forward and narrows the set layer by layer; that needs a
per-layer query set the one-pass hole plan does not have, and selecting on layer 1
is the step its own ablation relies on most.

Architectures: those of ``LlamaStack`` (Llama-style decoder layers). Others are refused.
"""

from __future__ import annotations

import torch


def deviation_scores(full_k: torch.Tensor, full_v: torch.Tensor, cached_k: torch.Tensor,
                     cached_v: torch.Tensor) -> torch.Tensor:
    """``dev(t)`` of the module docstring for ``[T, kv_heads, head_dim]`` inputs -> ``[T]`` (float32)."""
    dk = (full_k.float() - cached_k.float().to(full_k.device)).pow(2).flatten(1).sum(1)
    dv = (full_v.float() - cached_v.float().to(full_v.device)).pow(2).flatten(1).sum(1)
    return (dk + dv).cpu()
