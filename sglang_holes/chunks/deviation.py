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

How it is computed: two passes. Pass 1 is this probe: embedding, layer 0 in full
(causal attention over all ``n`` prompt tokens, MLP) and layer 1's K/V projections, in
float32 on the scheduler from the served model's own weights: about ``1/L`` of a full
prefill for an ``L``-layer model. Pass 2 is the one segmented prefill over the selected
tokens and every token no chunk covers. CacheBlend instead recomputes layer 1 for
all tokens inside the forward and narrows the set layer by layer; that needs a
per-layer query set the one-pass hole plan does not have, and selecting on layer 1
is the step its own ablation relies on most.

Architectures: Llama-style decoder layers (RMSNorm, rotary attention with optional
q/k/v bias, SiLU-gated MLP): Llama, SmolLM2, Qwen2, Mistral. Others are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sglang_holes.chunks.rope import RopeSpec, rerotate
from sglang_holes.hf_config import attention_dims

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


class DeviationUnsupportedError(ValueError):
    """The model's architecture is not one the deviation probe implements."""


def check_supported(config: Mapping[str, Any], tp_size: int = 1) -> None:
    """Raise ``DeviationUnsupportedError`` unless the probe can run for this model and server."""
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise DeviationUnsupportedError(
            f"the deviation policy supports {SUPPORTED_ARCHITECTURES}, not {archs or 'this model'}")
    if tp_size != 1:
        raise DeviationUnsupportedError("the deviation policy needs tensor parallel size 1 (the probe reads "
                                        "whole weight matrices)")


@dataclass(frozen=True)
class ProbeWeights:
    """Layer 0 and layer 1's K/V projections of a Llama-style model (Hugging Face names, float32)."""

    tensors: Mapping[str, torch.Tensor]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    rope: RopeSpec

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> ProbeWeights:
        """From a state dict with Hugging Face names (``model.layers.0.self_attn.q_proj.weight``...)."""
        check_supported(config)
        need = ["model.embed_tokens.weight"] + [f"model.layers.0.{n}.weight" for n in (
            "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + [
            f"model.layers.1.{n}.weight" for n in ("input_layernorm", "self_attn.k_proj", "self_attn.v_proj")]
        missing = [k for k in need if k not in state]
        if missing:
            raise DeviationUnsupportedError(f"weights missing for the deviation probe: {missing}")
        keep = need + [k for k in state if k.endswith("_proj.bias") and k.startswith(("model.layers.0.",
                                                                                      "model.layers.1."))]
        return cls({k: state[k].detach().float() for k in keep}, *attention_dims(config),
                   float(config.get("rms_norm_eps", 1e-6)), RopeSpec.from_config(config))

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.tensors[name + ".weight"], self.tensors.get(name + ".bias"))

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.tensors[name + ".weight"]

    def layer1_kv(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer 1's K (after RoPE) and V ``[n, kv_heads, head_dim]`` for a prompt at positions ``0..n-1``."""
        n, hd = input_ids.numel(), self.head_dim
        pos = torch.arange(n, dtype=torch.int64)
        emb = self.tensors["model.embed_tokens.weight"]
        x = F.embedding(input_ids.to(emb.device), emb)
        h = self._norm(x, "model.layers.0.input_layernorm")
        a = "model.layers.0.self_attn."
        q = rerotate(self._lin(h, a + "q_proj").view(n, self.num_heads, hd), pos, self.rope)
        k = rerotate(self._lin(h, a + "k_proj").view(n, self.num_kv_heads, hd), pos, self.rope)
        v = self._lin(h, a + "v_proj").view(n, self.num_kv_heads, hd)
        rep = self.num_heads // self.num_kv_heads
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(rep, 0),
                                           v.transpose(0, 1).repeat_interleave(rep, 0), is_causal=True)
        x = x + self._lin(o.transpose(0, 1).reshape(n, -1), a + "o_proj")
        h = self._norm(x, "model.layers.0.post_attention_layernorm")
        m = "model.layers.0.mlp."
        x = x + self._lin(F.silu(self._lin(h, m + "gate_proj")) * self._lin(h, m + "up_proj"), m + "down_proj")
        h = self._norm(x, "model.layers.1.input_layernorm")
        k1 = rerotate(self._lin(h, "model.layers.1.self_attn.k_proj").view(n, self.num_kv_heads, hd), pos,
                      self.rope)
        v1 = self._lin(h, "model.layers.1.self_attn.v_proj").view(n, self.num_kv_heads, hd)
        return k1, v1


def deviation_scores(full_k: torch.Tensor, full_v: torch.Tensor, cached_k: torch.Tensor,
                     cached_v: torch.Tensor) -> torch.Tensor:
    """``dev(t)`` of the module docstring for ``[T, kv_heads, head_dim]`` inputs -> ``[T]`` (float32)."""
    dk = (full_k.float() - cached_k.float().to(full_k.device)).pow(2).flatten(1).sum(1)
    dv = (full_v.float() - cached_v.float().to(full_v.device)).pow(2).flatten(1).sum(1)
    return (dk + dv).cpu()
