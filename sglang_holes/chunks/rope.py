"""RoPE re-rotation: move cached keys to another position without recomputing them.

Cached K is stored after RoPE. For rotary embeddings whose angle is linear in the
position (``θ_i · p`` with fixed per-pair frequencies ``θ_i``), rotating a key computed
at position ``p`` by ``δ · θ_i`` gives exactly the key computed at ``p + δ`` (rotations
compose; only float rounding differs). That holds for plain RoPE, ``linear`` scaling
(``θ_i / factor``) and Llama-3 scaling (fixed, smoothed ``θ_i``). It does NOT hold for
YaRN (its attention-magnitude factor would be applied twice), dynamic NTK
(frequencies depend on the sequence length) or LongRoPE (two frequency sets switched
by length): those are refused with ``UnsupportedRopeError``.

Layouts: ``neox`` (rotate-half: pairs ``(i, i + d/2)``, Llama/Qwen/SmolLM2 in
SGLang) and ``gptj`` (interleaved pairs ``(2i, 2i + 1)``). ``rotary_dim`` may be
smaller than the head dim (partial rotary): the rest of the head is left untouched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sglang_holes.hf_config import attention_dims

COMPOSABLE = ("default", "linear", "llama3")


class UnsupportedRopeError(ValueError):
    """The model's rotary embedding cannot be re-rotated by a position delta."""


@dataclass(frozen=True)
class RopeSpec:
    """Per-pair rotation frequencies of one model (radians per position)."""

    inv_freq: torch.Tensor  # [rotary_dim // 2], float64
    rotary_dim: int
    neox: bool = True

    def __post_init__(self) -> None:
        if self.rotary_dim % 2 or self.inv_freq.numel() != self.rotary_dim // 2:
            raise ValueError(f"inv_freq has {self.inv_freq.numel()} entries for rotary_dim={self.rotary_dim}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], neox: bool = True) -> RopeSpec:
        """From a Hugging Face config dict (``rope_theta``, ``head_dim`` or hidden/heads,
        ``partial_rotary_factor``, ``rope_scaling``/``rope_parameters``)."""
        head_dim = attention_dims(config).head_dim
        rotary_dim = int(head_dim * float(config.get("partial_rotary_factor", 1.0)))
        scaling = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
        theta = float(scaling.get("rope_theta") or config.get("rope_theta") or 10000.0)
        kind = scaling.get("rope_type") or scaling.get("type") or "default"
        if kind not in COMPOSABLE:
            raise UnsupportedRopeError(
                f"rope_scaling type {kind!r} cannot be re-rotated by a position delta (only {COMPOSABLE}): "
                "its angle or magnitude is not a fixed linear function of the position")
        inv = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
        if kind == "linear":
            inv = inv / float(scaling["factor"])
        elif kind == "llama3":
            inv = _llama3(inv, scaling)
        return cls(inv, rotary_dim, neox)

    def angles(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[len(delta), rotary_dim // 2]`` (float64) of rotating by ``delta`` positions."""
        a = delta.to(torch.float64)[:, None] * self.inv_freq[None, :]
        return a.cos(), a.sin()


def _llama3(inv: torch.Tensor, s: Mapping[str, Any]) -> torch.Tensor:
    """Llama-3 frequency smoothing (transformers' ``_compute_llama3_parameters``)."""
    factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(is_mid, mid, scaled)


def rerotate(k: torch.Tensor, delta: torch.Tensor | int, spec: RopeSpec) -> torch.Tensor:
    """Keys ``[T, H, D]`` (post-RoPE at positions ``p``) -> the same keys at ``p + delta``.

    ``delta``: an int or a ``[T]`` tensor of position deltas (may be negative). Computed
    in float64, returned in ``k.dtype``; dimensions past ``rotary_dim`` are copied.
    """
    T = k.shape[0]
    d = torch.full((T,), int(delta), dtype=torch.int64) if isinstance(delta, int) else delta.reshape(T)
    cos, sin = (x[:, None, :].to(k.device) for x in spec.angles(d.cpu()))  # [T, 1, R/2]
    R = spec.rotary_dim
    x = k[..., :R].to(torch.float64)
    if spec.neox:
        x1, x2 = x[..., : R // 2], x[..., R // 2 :]
        rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rot = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    out = k.clone()
    out[..., :R] = rot.to(k.dtype)
    return out
