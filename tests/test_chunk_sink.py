"""The attention sink under chunk reuse, against an independent Hugging Face reference.

A prompt that starts with a moved document must not put KV computed mid-sequence at
position 0 (the attention sink every later token leans on): the first ``SINK_TOKENS``
positions are recomputed under every policy, unless the chunk there was stored at
offset 0 (then its KV is exact in place). The reference is Hugging Face's Llama run
layer by layer on its own modules: positions the engine reports as recomputed
(``hole_spans``) are computed, every other position gets the stored prompt's K (from
Hugging Face's own forward over it) rotated by the position delta with Hugging Face's
RoPE, and its V. The engine's output distribution must match it to float32 rounding.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from sglang_holes.chunks.hints import chunk_envelope
from sglang_holes.config import SINK_TOKENS

pytestmark = pytest.mark.engine

# Engine (fp32, torch_native) vs this float64 reference through 30 layers: float32 rounding of
# values ~1-10 accumulated over the layers (the engine agrees with its own stock path to ~1e-5;
# see tests/test_holes_backend.py); 1e-4 in logprob is the suite's fp32 end-to-end bound.
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def hf_model(embedded_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(embedded_model), torch_dtype=torch.float64,
                                                 attn_implementation="eager")
    model.memo = {}  # per-module: the stored prompts' KV, freed with the model
    return model.eval()


def _stored_kv(model, ids: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, K (RoPE applied) and V ``[n, kv_heads, head_dim]`` of ``ids`` computed in full."""
    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    return [(cache.layers[i].keys[0].transpose(0, 1), cache.layers[i].values[0].transpose(0, 1))
            for i in range(model.config.num_hidden_layers)]


def _rotate(model, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``k`` ``[n, heads, d]`` rotated by ``delta[i]`` positions with Hugging Face's RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = model.model.rotary_emb(k.transpose(0, 1)[None], delta[None].to(torch.float64))
    rotated, _ = apply_rotary_pos_emb(k.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return rotated[0].transpose(0, 1)


def reference_logprobs(model, ids: list[int], computed: torch.Tensor, placed: list[tuple[torch.Tensor, torch.Tensor]]
                       ) -> torch.Tensor:
    """Log-probabilities ``[vocab]`` after ``ids`` when only ``computed`` positions run and the
    others read ``placed[layer]`` (K, V ``[n, kv_heads, head_dim]``), layer by layer."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    pos = computed.nonzero().flatten()
    h = model.model.embed_tokens(torch.tensor(ids)[pos])
    cos, sin = model.model.rotary_emb(h[None], pos[None])
    with torch.no_grad():
        for layer, (pk, pv) in zip(model.model.layers, placed, strict=True):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(-1, heads, d).transpose(0, 1)[None]
            k = a.k_proj(x).view(-1, kv_heads, d).transpose(0, 1)[None]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys, values = pk.clone(), pv.clone()
            keys[pos] = k[0].transpose(0, 1)
            values[pos] = a.v_proj(x).view(-1, kv_heads, d)
            rep = heads // kv_heads
            kk = keys.repeat_interleave(rep, dim=1).transpose(0, 1)  # [heads, n, d]
            vv = values.repeat_interleave(rep, dim=1).transpose(0, 1)
            scores = q[0] @ kk.transpose(1, 2) / math.sqrt(d)  # [heads, |pos|, n]
            scores = scores.masked_fill(torch.arange(len(ids))[None, None, :] > pos[None, :, None], -math.inf)
            out = (scores.softmax(-1) @ vv).transpose(0, 1).reshape(len(pos), heads * d)
            h = h + a.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = model.lm_head(model.model.norm(h[-1]))
    return logits.log_softmax(-1)


def _placed(model, stored_ids: list[int], ids: list[int], where: list[tuple[int, int, int]]):
    """The stored prompt's KV moved to ``ids``: ``where`` = (start in ids, start in stored, length)."""
    n = len(ids)
    out = []
    key = ("stored", tuple(stored_ids))
    if key not in model.memo:  # the parametrized cases share one stored prompt
        model.memo[key] = _stored_kv(model, key[1])
    for k1, v1 in model.memo[key]:
        k, v = k1.new_zeros((n, *k1.shape[1:])), v1.new_zeros((n, *v1.shape[1:]))
        for s, s1, length in where:
            delta = torch.full((length,), s - s1)
            k[s : s + length] = _rotate(model, k1[s1 : s1 + length], delta)
            v[s : s + length] = v1[s1 : s1 + length]
        out.append((k, v))
    return out


def _docs(tokenizer, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [tokenizer(f"Document {i}. " + " ".join(f"Item {i}.{j} weighs {rng.randint(2, 90)} grams and is "
                                                   f"{rng.choice(['red', 'blue', 'amber'])}." for j in range(5))
                      + "\n\n", add_special_tokens=False)["input_ids"] for i in range(3)]


def _prompt(docs: list[list[int]], order: list[int], question: list[int]) -> tuple[list[int], list[tuple]]:
    ids, spans = [], []
    for i in order:
        spans.append((len(ids), len(ids) + len(docs[i])))
        ids += docs[i]
    spans.append((len(ids), len(ids) + len(question)))
    return ids + question, spans


def _computed(meta: dict, n: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    for s, e in meta["hole_spans"]:
        mask[s:e] = True
    return mask


def _store_then_ask(engine, tokenizer, seed: int, questions: tuple[str, str], order: list[int], policy: str,
                    **params) -> tuple[dict, list[int], list[tuple[int, int, int]], list[int], torch.Tensor]:
    """Store three documents and a question as chunks in order 0, 1, 2, then ask the second question
    with the documents in ``order``. Returns the answer's ``meta_info``, the stored prompt, where each
    document moved (start in the asked prompt, start in the stored one, length), the asked prompt, and
    the positions the engine computed."""
    assert engine.flush_cache().success
    docs = _docs(tokenizer, seed)
    q1, q2 = (tokenizer(f"Question: {q}\nAnswer:", add_special_tokens=False)["input_ids"] for q in questions)
    stored_ids, stored_spans = _prompt(docs, [0, 1, 2], q1)
    engine.generate(input_ids=stored_ids, kv_hints=chunk_envelope(stored_spans, "none"),
                    sampling_params={"max_new_tokens": 1})
    ids, spans = _prompt(docs, order, q2)
    out = engine.generate(input_ids=ids, kv_hints=chunk_envelope(spans, policy, **params),
                          sampling_params={"max_new_tokens": 1, "temperature": 0.0},
                          return_logprob=True, top_logprobs_num=5)
    meta = out["meta_info"]
    where = [(spans[j][0], stored_spans[i][0], len(docs[i])) for j, i in enumerate(order)]
    return meta, stored_ids, where, ids, _computed(meta, len(ids))


def _assert_matches(meta: dict, ref: torch.Tensor) -> None:
    """The engine's top-5 next-token logprobs equal the reference's (and its argmax)."""
    top = meta["output_top_logprobs"][0]
    assert top[0][1] == int(ref.argmax())
    assert max(abs(lp - float(ref[t])) for lp, t, _ in top) <= LOGPROB_TOL, (top, ref.topk(5))


@pytest.mark.parametrize("policy, params", [("none", {}), ("first_k", {"k": 2}), ("query", {"ratio": 0.15}),
                                            ("explicit", {"recompute": [[30, 34]]})])
def test_a_moved_document_never_serves_the_sink(holes_engine, tokenizer, hf_model, policy, params):
    """Documents first, no system prompt: stored in one order, asked in another. Under every policy
    the first SINK_TOKENS positions are recomputed (reported), and the engine's next-token
    distribution equals the reference's over the same recomputed positions."""
    meta, stored_ids, where, ids, computed = _store_then_ask(
        holes_engine, tokenizer, 1, ("which item is heaviest?", "which item is blue?"), [2, 0, 1], policy, **params)
    assert computed[:SINK_TOKENS].all(), meta["hole_spans"]
    reuse = meta["chunk_reuse"]
    assert reuse["reused_chunks"] == 3 and reuse["sink_recomputed"] == max(0, SINK_TOKENS - params.get("k", 0))
    assert not computed[SINK_TOKENS : where[0][2]].all()  # the rest of the moved document is reused
    placed = _placed(hf_model, stored_ids, ids, where)
    _assert_matches(meta, reference_logprobs(hf_model, ids, computed, placed))
    if policy == "none":  # the comparison sees the sink: served from the moved KV, the answer moves
        moved = computed.clone()
        moved[:SINK_TOKENS] = False
        wrong = reference_logprobs(hf_model, ids, moved, placed)
        top = meta["output_top_logprobs"][0]
        assert max(abs(lp - float(wrong[t])) for lp, t, _ in top) > 10 * LOGPROB_TOL


def test_a_document_stored_at_offset_zero_serves_the_sink_in_place(holes_engine, tokenizer, hf_model):
    """The same document first again: its KV was computed at position 0 after nothing, so it is exact
    there and nothing is recomputed for the sink; the distribution still equals the reference."""
    meta, stored_ids, where, ids, computed = _store_then_ask(
        holes_engine, tokenizer, 2, ("what is amber?", "what is red?"), [0, 2, 1], "none")
    assert meta["chunk_reuse"]["sink_recomputed"] == 0 and not computed[: where[0][2]].any(), meta["hole_spans"]
    _assert_matches(meta, reference_logprobs(hf_model, ids, computed, _placed(hf_model, stored_ids, ids, where)))
