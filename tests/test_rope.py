"""RoPE re-rotation against Hugging Face's own rotary embedding (the model code SGLang mirrors)."""

from __future__ import annotations

import pytest
import torch

from sglang_holes.chunks.rope import RopeSpec, UnsupportedRopeError, rerotate

EPS32 = torch.finfo(torch.float32).eps


def _bound(max_pos: int, k: torch.Tensor) -> float:
    """Float rounding budget: HF (like SGLang) forms angles p·θ in float32, so each of the two
    fresh computations carries an angle error up to ~ε·p rad, i.e. ~ε·p·|k| on a key
    component, plus a few ε·|k| for the products; ×4 covers both and the rotation's own rounding."""
    return 4 * EPS32 * (max_pos + 8) * k.abs().max().item()


def _hf_keys(config_kwargs: dict, positions: torch.Tensor, k_pre: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(**config_kwargs)
    rope = LlamaRotaryEmbedding(cfg)
    x = k_pre.transpose(0, 1)[None]  # [1, H, T, D]
    cos, sin = rope(x, positions[None])
    _, k = apply_rotary_pos_emb(x, x, cos, sin)
    return k[0].transpose(0, 1)  # [T, H, D]


CONFIGS = {
    "plain (SmolLM2)": dict(hidden_size=576, num_attention_heads=9, head_dim=64, rope_theta=100000.0),
    "linear x4": dict(hidden_size=256, num_attention_heads=4, rope_theta=10000.0,
                      rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama3": dict(hidden_size=512, num_attention_heads=4, head_dim=128, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shift", [0, 37, 2500, -300])
def test_rerotated_key_equals_key_computed_at_new_position(name, shift):
    kw = CONFIGS[name]
    g = torch.Generator().manual_seed(0)
    heads, d = 3, kw.get("head_dim") or kw["hidden_size"] // kw["num_attention_heads"]
    pos = torch.arange(400, 464)
    k_pre = torch.randn(pos.numel(), heads, d, generator=g)
    at_old = _hf_keys(kw, pos, k_pre)
    at_new = _hf_keys(kw, pos + shift, k_pre)
    spec = RopeSpec.from_config({**kw, **({"rope_scaling": kw["rope_scaling"]} if "rope_scaling" in kw else {})})
    got = rerotate(at_old, shift, spec)
    assert (got - at_new).abs().max().item() <= _bound(int((pos + max(shift, 0)).max()), at_new)
    if shift:
        assert (at_old - at_new).abs().max().item() > 0.1  # the shift matters: the check is not vacuous


def test_per_token_deltas_and_partial_rotary():
    spec = RopeSpec.from_config({"hidden_size": 64, "num_attention_heads": 2, "partial_rotary_factor": 0.5})
    assert spec.rotary_dim == 16
    k = torch.randn(5, 2, 32)
    out = rerotate(k, torch.tensor([0, 1, 2, -3, 100]), spec)
    assert torch.equal(out[0], k[0]) and torch.equal(out[:, :, 16:], k[:, :, 16:])
    back = rerotate(out, torch.tensor([0, -1, -2, 3, -100]), spec)
    assert (back - k).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "longrope"])
def test_non_composable_rope_is_refused(kind):
    with pytest.raises(UnsupportedRopeError, match=kind):
        RopeSpec.from_config({"hidden_size": 64, "num_attention_heads": 2,
                              "rope_scaling": {"rope_type": kind, "factor": 4.0}})


@pytest.mark.parametrize("neox", [True, False])
def test_rerotation_follows_sglangs_rotary_layout(neox):
    """Interleaved (GPT-J style) and NeoX rotary layouts, against SGLang's own ``apply_rotary_emb``
    (what its ``RotaryEmbedding.forward_native`` calls; angles formed as its cos/sin cache does):
    keys rotated at ``p`` and re-rotated by ``shift`` equal the keys rotated at ``p + shift``."""
    from sglang.srt.layers.rotary_embedding.utils import apply_rotary_emb

    heads, d, shift, base = 2, 64, 300, 10000.0
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    pos = torch.arange(100, 164)
    k_pre = torch.randn(pos.numel(), heads, d, generator=torch.Generator().manual_seed(1))

    def keys(p: torch.Tensor) -> torch.Tensor:
        freqs = torch.einsum("i,j -> ij", p.float(), inv)
        return apply_rotary_emb(k_pre, freqs.cos(), freqs.sin(), neox)

    config = {"hidden_size": heads * d, "num_attention_heads": heads, "rope_theta": base}
    got, want = rerotate(keys(pos), shift, RopeSpec.from_config(config, neox=neox)), keys(pos + shift)
    assert (got - want).abs().max().item() <= _bound(int(pos.max()) + shift, want)
    wrong = rerotate(keys(pos), shift, RopeSpec.from_config(config, neox=not neox))
    assert (wrong - want).abs().max().item() > 0.1  # the layout matters: the check is not vacuous
