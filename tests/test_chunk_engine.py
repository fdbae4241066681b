"""RAG chunk mode in the real SGLang engine (CPU, embedded SmolLM2): chunk KV reused at any position.

Exactness where the definition demands it (re-rotated K at layer 0; a chunk reused
at its original offset after the same prefix; ``first_k`` with ``k`` >= chunk length),
chunk KV kept away from exact requests, tenants kept apart, bad hints refused.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch

from sglang_holes.config import SINK_TOKENS

pytestmark = pytest.mark.engine

SAMPLING = {"max_new_tokens": 4, "temperature": 0.0}
LOGPROB_TOL = 1e-4  # fp32 end to end, see tests/test_holes_backend.py
EPS32 = torch.finfo(torch.float32).eps


def _cache(eng) -> dict:
    return eng.get_server_info()["internal_states"][0]["sglang_holes"]["cache"]


def _docs(tokenizer, seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    texts = [f"Passage {i}: " + " ".join(f"The {rng.choice(['red', 'blue', 'green'])} box {i}-{j} holds "
                                          f"{rng.randint(1, 999)} coins." for j in range(rng.randint(8, 14)))
             for i in range(n)]
    return [tokenizer(t + "\n", add_special_tokens=False)["input_ids"] for t in texts]


def _question(tokenizer, text: str) -> list[int]:
    return tokenizer(f"Question: {text}\nAnswer:", add_special_tokens=False)["input_ids"]


def _gen(eng, **kw) -> dict:
    return eng.generate(sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5, **kw)


def _same(got: dict, ref: dict) -> None:
    assert got["output_ids"] == ref["output_ids"]
    for a, b in zip(got["meta_info"]["output_top_logprobs"], ref["meta_info"]["output_top_logprobs"], strict=True):
        assert [t[1] for t in a] == [t[1] for t in b]
        assert max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True)) <= LOGPROB_TOL
    meta = got["meta_info"]
    assert meta["cached_tokens"] + meta["recomputed_tokens"] == meta["prompt_tokens"], meta


@pytest.fixture
def chunk_engine(holes_engine):
    assert holes_engine.flush_cache().success
    yield holes_engine
    c = _cache(holes_engine)
    assert c["integrity"] == "ok" and c["protected"] == 0, c
    assert c["available"] + c["evictable"] == c["pool_size"], c


def test_rerotated_k_equals_k_computed_at_the_new_position(chunk_engine, tokenizer):
    """Layer-0 K depends only on the token and its position, so moving a stored chunk by
    re-rotation must give the K a fresh prefill computes there (float32 rounding aside)."""
    d0, d1 = _docs(tokenizer, 1, 2)
    q = _question(tokenizer, "How many coins?")
    chunk_engine.generate(prompt_chunks=[d1, q], sampling_params=SAMPLING)  # stores d1 at offset 0
    chunk_engine.generate(prompt_chunks=[d0 + d1, q], sampling_params=SAMPLING)  # d1 computed after d0
    target = len(d0)
    k_moved, v_moved, stored_at = chunk_engine.chunk_kv(d1, layer=0, offset=target)
    assert stored_at == 0
    k_fresh, v_fresh, _ = chunk_engine.chunk_kv(d0 + d1, layer=0)
    k_fresh, v_fresh = k_fresh[target:], v_fresh[target:]
    # SGLang forms RoPE angles p·θ in float32 (error ~ε·p rad at both positions) and the
    # projections differ by batch shape only: 4ε(p+8)·max|k| bounds it (tests/test_rope.py).
    bound = 4 * EPS32 * (target + len(d1) + 8) * k_fresh.abs().max().item()
    assert (k_moved - k_fresh).abs().max().item() <= bound
    assert (v_moved - v_fresh).abs().max().item() <= 8 * EPS32 * v_fresh.abs().max().item()
    k_unmoved = chunk_engine.chunk_kv(d1, layer=0)[0]  # what reuse without re-rotation would read
    assert (k_unmoved - k_fresh).abs().max().item() > 100 * bound


def test_same_offset_after_same_prefix_equals_exact(chunk_engine, engine, tokenizer):
    d1, d2 = _docs(tokenizer, 2, 2)
    q1, q2 = _question(tokenizer, "Which box is red?"), _question(tokenizer, "Which box holds most coins?")
    first = chunk_engine.generate(prompt_chunks=[d1, d2, q1], sampling_params=SAMPLING, chunk_policy="none")
    assert first["meta_info"]["chunk_reuse"]["reused_chunks"] == 0
    got = _gen(chunk_engine, prompt_chunks=[d1, d2, q2], chunk_policy="none")
    reuse = got["meta_info"]["chunk_reuse"]
    assert reuse == {"policy": "none", "chunks": 3, "reused_chunks": 2, "reused_tokens": len(d1) + len(d2),
                     "sink_recomputed": 0}  # d1 was stored at offset 0 after nothing: exact at the sink
    assert got["meta_info"]["cached_tokens"] == len(d1) + len(d2)
    assert got["meta_info"]["recomputed_tokens"] == len(q2)
    engine.flush_cache()
    _same(got, _gen(engine, input_ids=d1 + d2 + q2))


def test_first_k_covering_every_chunk_equals_exact(chunk_engine, engine, tokenizer):
    d1, d2, d3 = _docs(tokenizer, 3, 3)
    q = _question(tokenizer, "Which box is blue?")
    chunk_engine.generate(prompt_chunks=[d1, d2, d3, q], sampling_params=SAMPLING)
    got = _gen(chunk_engine, prompt_chunks=[d3, d1, d2, q], chunk_policy="first_k", chunk_k=10_000)
    reuse = got["meta_info"]["chunk_reuse"]
    assert reuse["reused_chunks"] == 4 and reuse["reused_tokens"] == 0, reuse
    engine.flush_cache()
    _same(got, _gen(engine, input_ids=d3 + d1 + d2 + q))


def test_query_with_ratio_one_equals_full_recompute(chunk_engine, engine, tokenizer):
    """``query`` at ratio 1 recomputes every reused token: the output is the cold run's; the
    probe ran (its scores only order tokens, so this checks the plumbing, not the scores)."""
    d1, d2, d3 = _docs(tokenizer, 6, 3)
    q = _question(tokenizer, "Which box holds 7 coins?")
    chunk_engine.generate(prompt_chunks=[d1, d2, d3, q], sampling_params=SAMPLING)
    got = _gen(chunk_engine, prompt_chunks=[d2, d1, d3, q], chunk_policy="query", chunk_ratio=1.0)
    reuse = got["meta_info"]["chunk_reuse"]
    assert reuse == {"policy": "query", "ratio": 1.0, "layers": 8, "chunks": 4, "reused_chunks": 4,
                     "reused_tokens": 0, "sink_recomputed": 0}, reuse  # all recomputed: the rule changed nothing
    engine.flush_cache()
    _same(got, _gen(engine, input_ids=d2 + d1 + d3 + q))


def test_chunk_requests_share_an_exact_system_prompt(chunk_engine, engine, tokenizer):
    """The positions before the first chunk are exact KV: chunk requests read them from the exact tree
    and insert them there; the chunks themselves never enter it."""
    from sglang_holes.chunks.hints import chunk_envelope

    head = tokenizer("System: answer from the passages only, in one word.\n", add_special_tokens=False)["input_ids"]
    d1, d2 = _docs(tokenizer, 8, 2)
    q = _question(tokenizer, "Which box is red?")

    def prompt(docs: list[list[int]], policy: str, **params) -> dict:
        ids, chunks = list(head), []
        for d in [*docs, q]:
            chunks.append((len(ids), len(ids) + len(d)))
            ids += d
        return {"input_ids": ids, "kv_hints": chunk_envelope(chunks, policy, **params)}

    first = chunk_engine.generate(**prompt([d1, d2], "none"), sampling_params=SAMPLING)["meta_info"]
    assert first["cached_tokens"] == 0 and "prefix_tokens" not in first["chunk_reuse"]
    other = chunk_engine.generate(input_ids=head + _question(tokenizer, "Anything else?"),
                                  sampling_params=SAMPLING)["meta_info"]
    assert other["cached_tokens"] == len(head)  # an exact request reuses the prefix a chunk request computed
    # every chunk token recomputed: with the prefix read from the tree, the output is the cold run's
    moved = prompt([d2, d1], "first_k", k=10_000)
    got = _gen(chunk_engine, **moved)
    reuse = got["meta_info"]["chunk_reuse"]
    assert reuse["prefix_tokens"] == len(head) and reuse["reused_chunks"] == 3 and reuse["reused_tokens"] == 0
    assert got["meta_info"]["cached_tokens"] == len(head)
    engine.flush_cache()
    _same(got, _gen(engine, input_ids=moved["input_ids"]))
    # reused in place with chunk reuse too; and no chunk KV reached the exact tree
    again = chunk_engine.generate(**prompt([d1, d2], "none"), sampling_params=SAMPLING)["meta_info"]
    assert again["chunk_reuse"]["prefix_tokens"] == len(head)
    assert again["cached_tokens"] == len(head) + again["chunk_reuse"]["reused_tokens"]
    exact = chunk_engine.generate(input_ids=moved["input_ids"], sampling_params=SAMPLING)["meta_info"]
    assert exact["cached_tokens"] == len(head)


def test_explicit_recompute_spans(chunk_engine, tokenizer):
    """The ``explicit`` policy (the benchmark oracle's) recomputes exactly the given spans."""
    from sglang_holes.chunks.hints import chunk_envelope

    d1, d2 = _docs(tokenizer, 7, 2)
    q = _question(tokenizer, "Which box?")
    chunk_engine.generate(prompt_chunks=[d1, d2, q], sampling_params=SAMPLING)
    ids, hints, chunks = chunk_engine.chunked_prompt([d2, d1, q])
    (s, e) = chunks[1]
    hints = chunk_envelope(chunks, "explicit", recompute=[(s, s + 3), (e - 2, e)])
    meta = chunk_engine.generate(input_ids=ids, kv_hints=hints, sampling_params=SAMPLING)["meta_info"]
    # the spans, the last token and the attention sink (d2 moved to position 0)
    assert meta["chunk_reuse"]["reused_tokens"] == len(ids) - 5 - 1 - SINK_TOKENS
    assert [s, s + 3] in meta["hole_spans"] and [e - 2, e] in meta["hole_spans"]
    assert meta["hole_spans"][0] == [0, SINK_TOKENS] and meta["chunk_reuse"]["sink_recomputed"] == SINK_TOKENS


@pytest.mark.parametrize("policy, params", [("none", {}), ("first_k", {"chunk_k": 8}),
                                            ("deviation", {"chunk_ratio": 0.25}),
                                            ("query", {"chunk_ratio": 0.25, "chunk_layers": 3})])
def test_moved_chunks_are_reused_under_each_policy(chunk_engine, tokenizer, policy, params):
    d1, d2, d3 = _docs(tokenizer, 4, 3)
    q = _question(tokenizer, "Which box is green?")
    chunk_engine.generate(prompt_chunks=[d1, d2, d3, q], sampling_params=SAMPLING)
    got = chunk_engine.generate(prompt_chunks=[d2, d3, d1, q], sampling_params=SAMPLING, chunk_policy=policy,
                                **params)
    meta = got["meta_info"]
    n = len(d1) + len(d2) + len(d3) + len(q)  # every token is in a stored chunk (q too: same offset)
    # Always recomputed: the last token (its logits start generation) and the attention sink (d2
    # moved to position 0; first_k's 8 first tokens of each chunk cover it); the ratio takes from the rest.
    candidates = n - 1 - SINK_TOKENS
    expect = {"none": candidates, "first_k": n - 4 * 8 - 1, "deviation": candidates - round(0.25 * candidates),
              "query": candidates - round(0.25 * candidates)}[policy]
    assert meta["chunk_reuse"]["reused_chunks"] == 4
    assert meta["chunk_reuse"]["reused_tokens"] == expect, (meta["chunk_reuse"], expect)
    assert meta["hole_spans"][0][0] == 0 and meta["hole_spans"][0][1] >= SINK_TOKENS
    assert meta["cached_tokens"] == meta["chunk_reuse"]["reused_tokens"]
    assert meta["cached_tokens"] + meta["recomputed_tokens"] == meta["prompt_tokens"] == n


def test_chunk_kv_never_reaches_exact_requests(chunk_engine, tokenizer):
    d1, d2 = _docs(tokenizer, 5, 2)
    q = _question(tokenizer, "Anything?")
    chunk_engine.generate(prompt_chunks=[d1, d2, q], sampling_params=SAMPLING)
    exact = chunk_engine.generate(input_ids=d1 + d2 + q, sampling_params=SAMPLING)
    assert exact["meta_info"]["cached_tokens"] == 0  # the chunk request wrote nothing to the tree
    again = chunk_engine.generate(prompt_chunks=[d1, d2, q], sampling_params=SAMPLING)
    assert again["meta_info"]["chunk_reuse"]["reused_chunks"] == 3  # chunk requests read the store only
    assert _cache(chunk_engine)["chunks"]["entries"] == 3


def test_tenants_do_not_share_chunks(chunk_engine, tokenizer):
    d1, q = _docs(tokenizer, 6, 1)[0], _question(tokenizer, "Who?")
    chunk_engine.generate(prompt_chunks=[d1, q], sampling_params=SAMPLING, cache_salt="tenant-a")
    other = chunk_engine.generate(prompt_chunks=[d1, q], sampling_params=SAMPLING, cache_salt="tenant-b")
    assert other["meta_info"]["chunk_reuse"]["reused_chunks"] == 0
    same = chunk_engine.generate(prompt_chunks=[d1, q], sampling_params=SAMPLING, cache_salt="tenant-a")
    assert same["meta_info"]["chunk_reuse"]["reused_chunks"] == 2


def _envelope(payload: dict, version: str = "1", n_actions: int = 1) -> dict:
    action = {"action_id": "a", "action_type": "sglang_holes.chunks", "action_version": version, "payload": payload}
    return {"protocol_version": "1", "message_id": "m", "actions": [action] * n_actions}


BAD_HINTS = [
    (_envelope({"chunks": [[10, 20], [0, 5]]}), "sorted"),
    (_envelope({"chunks": [[0, 10], [5, 15]]}), "overlap"),
    (_envelope({"chunks": [[0, 10_000]]}), "out of range"),
    (_envelope({"chunks": [[0, 5]], "policy": "magic"}), "unknown chunk policy"),
    (_envelope({"chunks": [[0, 5]]}, version="9"), "not supported"),
    (_envelope({"chunks": [[0, 5]]}, n_actions=2), "one request takes one"),
    (_envelope({"chunks": [[0, 5]], "k": -3}), "k must be"),
    ({"protocol_version": "1"}, "Malformed kv_hints"),
    ({**_envelope({"chunks": [[0, 5]]}), "protocol_version": "99"}, "protocol_version '99' is not supported"),
    (_envelope({"chunks": [[0, 5]], "policy": "deviation", "ratio": True}), "ratio must be"),
    (_envelope({"chunks": [[0, 5]], "k": True}), "k must be"),
]


@pytest.mark.parametrize("hints, message", BAD_HINTS)
def test_malformed_hints_are_refused(chunk_engine, tokenizer, hints, message):
    ids = _docs(tokenizer, 7, 1)[0]
    with pytest.raises(ValueError, match=message):
        chunk_engine.generate(input_ids=ids, sampling_params=SAMPLING, kv_hints=hints)
    assert chunk_engine.generate(input_ids=ids, sampling_params=SAMPLING)["meta_info"]["completion_tokens"] == 4


def test_one_chunk_envelope_on_a_batch_is_refused(chunk_engine, tokenizer):
    """Chunk offsets belong to one prompt: a batch takes a list of envelopes, one per prompt."""
    a, b = _docs(tokenizer, 9, 2)
    hints = _envelope({"chunks": [[0, 5]]})
    with pytest.raises(ValueError, match="one envelope per prompt"):
        chunk_engine.generate(input_ids=[a, b], sampling_params=SAMPLING, kv_hints=hints)
    out = chunk_engine.generate(input_ids=[a, b], sampling_params=SAMPLING, kv_hints=[hints, None])
    assert out[0]["meta_info"]["chunk_reuse"]["chunks"] == 1 and "chunk_reuse" not in out[1]["meta_info"]


def test_engine_api_rejects_mixed_arguments(chunk_engine):
    with pytest.raises(ValueError, match="instead of prompt"):
        chunk_engine.generate(prompt="hi", prompt_chunks=["a"], sampling_params=SAMPLING)
    with pytest.raises(ValueError, match="non-empty"):
        chunk_engine.generate(prompt_chunks=[], sampling_params=SAMPLING)
    with pytest.raises(ValueError, match="not in the chunk store"):
        chunk_engine.chunk_kv([1, 2, 3])


def test_input_logprobs_of_the_tail_under_chunk_reuse(chunk_engine, engine, tokenizer):
    """Input logprobs from ``logprob_start_len`` on (teacher forcing, as bench_quality uses):
    those positions are recomputed, the chunks before them reused."""
    d1, d2 = _docs(tokenizer, 8, 2)
    q = _question(tokenizer, "Which box is red?")
    answer = tokenizer(" The red box.", add_special_tokens=False)["input_ids"]
    chunk_engine.generate(prompt_chunks=[d1, d2, q], sampling_params=SAMPLING)
    ids = chunk_engine.chunked_prompt([d2, d1]).input_ids + q + answer
    start = len(ids) - len(answer) - 1
    kw = dict(input_ids=ids, sampling_params={"max_new_tokens": 1, "temperature": 0.0}, return_logprob=True,
              logprob_start_len=start, top_logprobs_num=3)
    hints = chunk_engine.chunked_prompt([d2, d1], "first_k", k=10_000).kv_hints
    exact = chunk_engine.generate(kv_hints=hints, **kw)
    assert exact["meta_info"]["chunk_reuse"]["reused_chunks"] == 2
    engine.flush_cache()
    ref = engine.generate(**kw)
    got_lp = [x[0] for x in exact["meta_info"]["input_token_logprobs"]]
    ref_lp = [x[0] for x in ref["meta_info"]["input_token_logprobs"]]
    assert len(got_lp) == len(ref_lp) == len(answer) + 1
    assert max(abs(a - b) for a, b in zip(got_lp[1:], ref_lp[1:], strict=True)) <= LOGPROB_TOL
    reused = chunk_engine.generate(kv_hints=chunk_engine.chunked_prompt([d2, d1], "none").kv_hints, **kw)
    meta = reused["meta_info"]
    assert meta["chunk_reuse"]["reused_tokens"] == len(d1) + len(d2) - SINK_TOKENS  # d2 moved to the sink
    assert meta["hole_spans"] == [[0, SINK_TOKENS], [len(d1) + len(d2), len(ids)]]
    assert len(meta["input_token_logprobs"]) == len(answer) + 1
    assert [x[1] for x in meta["input_token_logprobs"]] == [x[1] for x in ref["meta_info"]["input_token_logprobs"]]


@pytest.fixture(scope="module")
def yarn_engine(engines, tiny_llama, tmp_path_factory) -> Iterator[object]:
    """The tiny Llama with YaRN RoPE scaling: its keys cannot be re-rotated by a position delta."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("tiny-llama-yarn")
    for f in tiny_llama.iterdir():
        shutil.copy(f, path / f.name)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                              "original_max_position_embeddings": 2048}
    (path / "config.json").write_text(json.dumps(cfg))
    with engines.scoped(model_path=str(path), skip_tokenizer_init=True, log_level="error", random_seed=0,
                        radix_cache_backend="holes", max_total_tokens=2000) as eng:
        yield eng


def test_rope_that_cannot_be_rerotated_is_refused_at_entry(yarn_engine):
    from sglang_holes.chunks.hints import build_chunked_prompt

    p = build_chunked_prompt([[5, 6, 7, 8], [9, 10, 11]], lambda text: [], policy="none")
    with pytest.raises(ValueError, match="cannot be re-rotated"):
        yarn_engine.generate(input_ids=p.input_ids, kv_hints=p.kv_hints, sampling_params=SAMPLING)
    out = yarn_engine.generate(input_ids=p.input_ids, sampling_params=SAMPLING)  # plain requests still served
    assert out["meta_info"]["completion_tokens"] == 4
