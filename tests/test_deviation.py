"""The deviation probe (layer 0 in full + layer 1's K/V, ``LlamaStack``) against Hugging Face's Llama,
and the copy path."""

from __future__ import annotations

import pytest
import torch

from sglang_holes.chunks.deviation import deviation_scores
from sglang_holes.chunks.kv_copy import copy_rerotated
from sglang_holes.chunks.llama_stack import LlamaStack, ProbeUnsupportedError
from sglang_holes.chunks.rope import RopeSpec, rerotate

# Both sides run the same float32 operations in a different order (fused vs split
# projections, SDPA vs eager attention): differences are a few float32 ulps of values
# of size ~1 accumulated over a 64-wide hidden state, far below 1e-4.
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                      architectures=["LlamaForCausalLM"], attention_bias=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a non-zero bias, so a probe that dropped it would fail
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    return model


def _hf_layer1_kv(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config
    n, hd = ids.numel(), cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        hs = model(ids[None], output_hidden_states=True).hidden_states[1]  # residual after layer 0
        layer = model.model.layers[1]
        h = layer.input_layernorm(hs)
        k = layer.self_attn.k_proj(h).view(1, n, -1, hd).transpose(1, 2)
        v = layer.self_attn.v_proj(h).view(n, -1, hd)
        cos, sin = model.model.rotary_emb(h, torch.arange(n)[None])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k[0].transpose(0, 1), v


def test_probe_matches_hf_layer1_kv(hf_llama):
    probe = LlamaStack.from_state(hf_llama.state_dict(), hf_llama.config.to_dict(), num_layers=2)
    ids = torch.randint(0, 300, (57,), generator=torch.Generator().manual_seed(1))
    out = probe.run(ids)
    k, v = out.k[1], out.v[1]
    k_ref, v_ref = _hf_layer1_kv(hf_llama, ids)
    assert k.shape == k_ref.shape == (57, 2, 16)
    assert (k - k_ref).abs().max().item() <= TOL
    assert (v - v_ref).abs().max().item() <= TOL
    assert deviation_scores(k, v, k_ref, v_ref).max().item() <= 57 * TOL ** 2 * 64
    # Context matters from layer 1 on: the same tokens after another prefix give other KV.
    out2 = probe.run(torch.cat([torch.tensor([5, 6, 7]), ids]))
    k2, v2 = out2.k[1], out2.v[1]
    dev = deviation_scores(k2[3:], v2[3:], k, v)
    assert dev.shape == (57,) and dev.min().item() > 0


def test_probe_refuses_other_architectures(hf_llama):
    cfg = dict(hf_llama.config.to_dict(), architectures=["GPT2LMHeadModel"])
    with pytest.raises(ProbeUnsupportedError, match="chunk probe supports"):
        LlamaStack.from_state(hf_llama.state_dict(), cfg, 2)
    state = {k: v for k, v in hf_llama.state_dict().items() if "layers.1.self_attn.k_proj.weight" not in k}
    with pytest.raises(ProbeUnsupportedError, match="missing"):
        LlamaStack.from_state(state, hf_llama.config.to_dict(), 2)


def test_copy_rerotated_moves_k_and_copies_v():
    spec = RopeSpec.from_config({"num_attention_heads": 2, "hidden_size": 32})
    g = torch.Generator().manual_seed(0)
    kb = [torch.randn(20, 2, 16, generator=g) for _ in range(3)]
    vb = [torch.randn(20, 2, 16, generator=g) for _ in range(3)]
    before_k = [b.clone() for b in kb]
    src, dst = torch.tensor([1, 2, 3]), torch.tensor([10, 12, 14])
    copy_rerotated(kb, vb, src, dst, 7, spec)
    for layer in range(3):
        assert torch.equal(kb[layer][dst], rerotate(before_k[layer][src], 7, spec))
        assert torch.equal(vb[layer][dst], vb[layer][src])
        untouched = torch.ones(20, dtype=torch.bool)
        untouched[dst] = False
        assert torch.equal(kb[layer][untouched], before_k[layer][untouched])
    with pytest.raises(ValueError, match="source slots"):
        copy_rerotated(kb, vb, src, dst[:2], 1, spec)
