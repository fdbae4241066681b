"""Recompute cost of KV positions, from a model config (drives ``cost-aware`` eviction).

Recomputing the KV of positions ``[a, b)`` of a sequence (all layers) costs

    cost([a, b)) = linear · (b − a) + attention · Σ_{p=a}^{b−1} (p + 1)      FLOPs

* ``linear`` = FLOPs per token of everything but attention scores: per layer
  ``2 · (h·(Hq·D) + 2·h·(Hkv·D) + (Hq·D)·h + 3·h·I)`` (Q, K, V, O projections and a
  gated MLP; 2 FLOPs per multiply-add), times the number of layers.
* ``attention`` = FLOPs per (query, key) pair: ``4 · Hq · D`` per layer (QKᵀ and PV),
  times the number of layers. The query at position ``p`` attends ``p + 1`` keys.

So a token deep in a long context is far more expensive to rebuild than one near the
start: for Llama-3-8B, ``linear`` ≈ 14 GFLOP and ``attention`` ≈ 0.52 MFLOP per key, so
attention overtakes the linear part at position ≈ 27k.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sglang_holes.hf_config import attention_dims


@dataclass(frozen=True)
class RecomputeCost:
    """FLOP constants of one model. Build with ``from_config`` or one of the presets."""

    linear_flops_per_token: float
    attention_flops_per_key: float

    def __post_init__(self) -> None:
        if self.linear_flops_per_token < 0 or self.attention_flops_per_key < 0:
            raise ValueError("RecomputeCost constants must be >= 0")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RecomputeCost:
        """From a Hugging Face style config: ``hidden_size``, ``num_hidden_layers``,
        ``num_attention_heads``, ``num_key_value_heads`` (default: = heads), ``head_dim``
        (default: hidden / heads), ``intermediate_size``."""
        try:
            h = int(config["hidden_size"])
            layers = int(config["num_hidden_layers"])
            inter = int(config["intermediate_size"])
            hq, hkv, d = attention_dims(config)
        except KeyError as e:
            raise ValueError(f"model config lacks {e.args[0]!r}") from None
        per_layer = 2 * (h * hq * d + 2 * h * hkv * d + hq * d * h + 3 * h * inter)
        return cls(float(per_layer * layers), float(4 * hq * d * layers))

    def span(self, a: int, b: int) -> float:
        """FLOPs to recompute positions ``[a, b)``."""
        if b <= a:
            return 0.0
        keys = (b * (b + 1) - a * (a + 1)) // 2  # Σ_{p=a}^{b-1} (p + 1)
        return self.linear_flops_per_token * (b - a) + self.attention_flops_per_key * keys


LLAMA3_8B = RecomputeCost.from_config(
    {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
     "head_dim": 128, "intermediate_size": 14336}
)
SMOLLM2_135M = RecomputeCost.from_config(
    {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
     "head_dim": 64, "intermediate_size": 1536}
)
