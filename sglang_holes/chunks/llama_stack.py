"""The first layers of a Llama-style decoder in plain torch: the chunk policies' probe model.

A chunk request's policies look at the prompt before its one segmented prefill:
``deviation`` needs layer 1's K/V with full context, ``query`` needs the attention the
question pays to the reused tokens as they are placed, and the quality benchmark's oracle
needs every layer's full-context K/V. All three are one computation: run the positions
marked ``computed`` through layers ``[0, layers)``, each attending (causally, by original
position) to the keys of every position, which are the computed ones' own K/V and, for
the others, the KV given by ``placed(layer)``: the stored chunk KV as it would be placed.

With ``computed`` all True nothing is placed: a plain full-context prefill.

Architectures: Llama-style decoder layers (RMSNorm, rotary attention with optional
q/k/v bias, SiLU-gated MLP): Llama, SmolLM2, Qwen2, Mistral. Others are refused.
Weights use Hugging Face names and are kept in float32 on their device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from sglang_holes.chunks.rope import RopeSpec, rerotate
from sglang_holes.hf_config import attention_dims

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
_FULL = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

Placed = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class ProbeUnsupportedError(ValueError):
    """The model's architecture, or the server, is not one the probe implements."""


def check_supported(config: Mapping[str, Any], tp_size: int = 1) -> None:
    """Raise ``ProbeUnsupportedError`` unless the probe can run for this model and server."""
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ProbeUnsupportedError(f"the chunk probe supports {SUPPORTED_ARCHITECTURES}, not {archs or 'this model'}")
    if tp_size != 1:
        raise ProbeUnsupportedError("the chunk probe needs tensor parallel size 1 (it reads whole weight matrices)")


class StackOutput(NamedTuple):
    """``k``/``v``: per layer ``[n, kv_heads, head_dim]`` (K after RoPE) at every position: computed
    or placed. ``mass``: float32 ``[n]``, attention paid to each key by the scored queries (mean over
    layers, heads and queries: it sums to 1 over the keys), or None when nothing was scored."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    mass: torch.Tensor | None


@dataclass(frozen=True)
class LlamaStack:
    """Layers ``[0, num_layers)`` of a Llama-style model (see module docstring)."""

    tensors: Mapping[str, torch.Tensor]
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    rope: RopeSpec

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], config: Mapping[str, Any], num_layers: int,
                   dtype: torch.dtype | None = torch.float32) -> LlamaStack:
        """From a state dict with Hugging Face names (``model.layers.0.self_attn.q_proj.weight``...).

        ``dtype``: the weights' (and the computation's) dtype; None keeps the given tensors, so a
        probe over a served model's weights copies nothing (softmax runs in float32 either way).
        """
        check_supported(config)
        if not 1 <= num_layers <= int(config["num_hidden_layers"]):
            raise ProbeUnsupportedError(f"the probe needs 1 to {config['num_hidden_layers']} layers, not {num_layers}")
        need = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{n}.weight" for i in range(num_layers)
                                                for n in _FULL]
        missing = [k for k in need if k not in state]
        if missing:
            raise ProbeUnsupportedError(f"weights missing for the chunk probe: {missing[:4]}")
        layers = tuple(f"model.layers.{i}." for i in range(num_layers))
        keep = need + [k for k in state if k.endswith("_proj.bias") and k.startswith(layers)]
        return cls({k: state[k].detach().to(dtype or state[k].dtype) for k in keep}, num_layers,
                   *attention_dims(config),
                   float(config.get("rms_norm_eps", 1e-6)), RopeSpec.from_config(config))

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.tensors[name + ".weight"], self.tensors.get(name + ".bias"))

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.tensors[name + ".weight"]

    def run(self, input_ids: torch.Tensor, computed: torch.Tensor | None = None, placed: Placed | None = None,
            layers: int | None = None, scored: torch.Tensor | None = None) -> StackOutput:
        """Run ``input_ids [n]`` (positions ``0..n-1``) through layers ``[0, layers)``.

        ``computed``: bool ``[n]`` (default all): the positions run through the layers; the
        others take ``placed(layer) -> (k, v)``, each ``[n, kv_heads, head_dim]`` (rows at the
        placed positions are read). ``scored``: bool ``[n]``, a subset of ``computed``: the
        queries whose attention is summed into ``mass``. The last layer stops after attention.
        """
        n = input_ids.numel()
        layers = self.num_layers if layers is None else layers
        if not 1 <= layers <= self.num_layers:
            raise ValueError(f"layers must be in [1, {self.num_layers}], got {layers}")
        emb = self.tensors["model.embed_tokens.weight"]
        dev = emb.device
        computed = torch.ones(n, dtype=torch.bool) if computed is None else computed.cpu()
        if not bool(computed.all()) and placed is None:
            raise ValueError("positions that are not computed need placed KV")
        rows = computed.nonzero().flatten()
        pos = rows.to(dev)
        x = F.embedding(input_ids.to(dev)[pos], emb)
        q_idx = None if scored is None else (scored.cpu()[rows]).nonzero().flatten().to(dev)
        if q_idx is not None and int(scored.sum()) != q_idx.numel():
            raise ValueError("scored queries must be computed positions")
        ks, vs, mass = [], [], torch.zeros(n, dtype=torch.float32, device=dev)
        causal = torch.arange(n, device=dev)[None, :] <= pos[:, None]  # key j visible to the query at p: j <= p
        for layer in range(layers):
            a = f"model.layers.{layer}."
            h = self._norm(x, a + "input_layernorm")
            k, v = self._kv(h, a, pos, placed, layer, computed, rows, n)
            ks.append(k)
            vs.append(v)
            q = rerotate(self._lin(h, a + "self_attn.q_proj").view(-1, self.num_heads, self.head_dim), pos, self.rope)
            o, probs = self._attend(q, k, v, causal, want_probs=q_idx is not None)
            if probs is not None:
                mass += probs[:, q_idx].sum(dim=(0, 1))
            if layer == layers - 1:
                break
            x = x + self._lin(o.reshape(o.shape[0], -1), a + "self_attn.o_proj")
            h = self._norm(x, a + "post_attention_layernorm")
            m = a + "mlp."
            x = x + self._lin(F.silu(self._lin(h, m + "gate_proj")) * self._lin(h, m + "up_proj"), m + "down_proj")
        if q_idx is None or q_idx.numel() == 0:
            return StackOutput(ks, vs, None)
        return StackOutput(ks, vs, (mass / (layers * self.num_heads * q_idx.numel())).cpu())

    def _kv(self, h: torch.Tensor, a: str, pos: torch.Tensor, placed: Placed | None, layer: int,
            computed: torch.Tensor, rows: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K (after RoPE) and V of every position at this layer: computed rows, placed rows elsewhere."""
        shape = (-1, self.num_kv_heads, self.head_dim)
        k_c = rerotate(self._lin(h, a + "self_attn.k_proj").view(shape), pos, self.rope)
        v_c = self._lin(h, a + "self_attn.v_proj").view(shape)
        if bool(computed.all()):
            return k_c, v_c
        pk, pv = placed(layer)
        k = pk.to(k_c).clone()
        v = pv.to(v_c).clone()
        k[rows.to(k.device)] = k_c
        v[rows.to(v.device)] = v_c
        return k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, want_probs: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``q [m, H, D]`` over ``k, v [n, Hkv, D]`` under ``keep [m, n]`` -> (out [m, H, D], probs)."""
        rep = self.num_heads // self.num_kv_heads
        qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H(kv), m|n, D]
        kh, vh = kh.repeat_interleave(rep, 0), vh.repeat_interleave(rep, 0)
        if not want_probs:
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=keep)
            return o.transpose(0, 1), None
        s = (qh.float() @ kh.float().transpose(1, 2)) * self.head_dim**-0.5
        p = s.masked_fill(~keep, float("-inf")).softmax(-1)  # [H, m, n]
        return (p.to(vh.dtype) @ vh).transpose(0, 1), p
