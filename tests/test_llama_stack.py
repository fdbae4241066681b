"""The chunk probe model (``LlamaStack``) against Hugging Face's Llama on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from sglang_holes.chunks.llama_stack import LlamaStack, ProbeUnsupportedError

# Both sides run float32 in a different order (split vs fused ops, SDPA vs eager): a few ulps of
# values of size ~1 accumulated over a 64-wide hidden state and 3 layers, far below 1e-4. The
# attention-mass check runs HF in float64: the probe's float32 probabilities differ by ~1e-7.
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                      architectures=["LlamaForCausalLM"], attention_bias=True, attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    stack = LlamaStack.from_state(model.state_dict(), cfg.to_dict(), num_layers=3)
    return model, stack


def _hf_kv(model, ids):
    with torch.no_grad():
        cache = model(ids[None], use_cache=True).past_key_values
    return [(cache.layers[i].keys[0].transpose(0, 1), cache.layers[i].values[0].transpose(0, 1))
            for i in range(model.config.num_hidden_layers)]


def test_full_context_kv_matches_hf(tiny):
    model, stack = tiny
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1))
    out = stack.run(ids)
    for layer, (k, v) in enumerate(_hf_kv(model, ids)):
        assert (out.k[layer] - k).abs().max() < TOL and (out.v[layer] - v).abs().max() < TOL


def test_computing_a_subset_against_exact_placed_kv_is_exact(tiny):
    """Placed KV equal to the full-context KV: the computed positions get the full-context KV too."""
    _, stack = tiny
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(2))
    full = stack.run(ids)
    computed = torch.zeros(40, dtype=torch.bool)
    computed[[0, 1, 7, 8, 9, 30, 39]] = True
    part = stack.run(ids, computed, placed=lambda layer: (full.k[layer], full.v[layer]))
    for layer in range(3):
        assert (part.k[layer] - full.k[layer]).abs().max() < TOL


def test_attention_mass_matches_dense_float64(tiny):
    """``mass`` = attention of the scored queries on each key, averaged over layers, heads and queries."""
    model, stack = tiny
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(3))
    scored = torch.zeros(40, dtype=torch.bool)
    scored[32:] = True  # "the question"
    with torch.no_grad():
        att = model.double()(ids[None], output_attentions=True).attentions  # per layer [1, H, n, n]
    model.float()
    full = stack.run(ids)

    def exact(layer):
        return full.k[layer], full.v[layer]

    for layers in (1, 3):
        want = torch.stack([a[0, :, 32:, :] for a in att[:layers]]).mean(dim=(0, 1, 2))
        got = stack.run(ids, scored=scored, layers=layers).mass
        assert got.shape == (40,) and abs(float(got.sum()) - 1.0) < 1e-5
        assert (got.double() - want).abs().max() < 1e-6
        # the same through a partial run against exact placed KV
        computed = scored.clone()
        computed[:5] = True
        part = stack.run(ids, computed, exact, layers, scored)
        assert (part.mass.double() - want).abs().max() < 1e-5


def test_refusals(tiny):
    model, stack = tiny
    cfg = model.config.to_dict()
    with pytest.raises(ProbeUnsupportedError, match="supports"):
        LlamaStack.from_state(model.state_dict(), {**cfg, "architectures": ["GPT2LMHeadModel"]}, 1)
    with pytest.raises(ProbeUnsupportedError, match="layers"):
        LlamaStack.from_state(model.state_dict(), cfg, 4)
    with pytest.raises(ValueError, match="placed KV"):
        stack.run(torch.arange(5), torch.tensor([True, False, True, True, True]))
