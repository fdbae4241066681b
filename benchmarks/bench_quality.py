"""RAG chunk reuse: answer quality vs recomputed tokens, and TTFT, on MuSiQue (real engine, CPU).

    .venv/bin/python benchmarks/bench_quality.py [--questions 50] [--passage-tokens 150] [--configs none,query:0.15,...]
        [--settings chat,docs_first] [--answer-tokens 32]

Workload: ../shared/data/musique_s.json, 10 passages per question, for the embedded
SmolLM2-135M-Instruct. Passages are truncated to ``--passage-tokens`` tokens for CPU time
only (the model's 8k context would hold them whole). For each question the passages are
first sent in one shuffled order (a chunk request that stores every passage, and the same
prompt without hints for the exact tree), then evaluated in ANOTHER order, so reuse is
non-prefix. Two prompt shapes (``SETTINGS``), each its own table and plot row:

* ``chat``: the chat template with a system prompt, the passages (the chunks) separated by
  blank lines that are not chunks, then the question: the exact tree serves the shared head,
  so the attention sink is exact;
* ``docs_first``: no system prompt, no template, no BOS (SmolLM2 adds none): the passages
  first, each a chunk ending in its blank line, then the question as the last chunk (new for
  every request). The prompt starts with a moved document: the attention sink rule
  (``SGLANG_HOLES_CHUNK_SINK_TOKENS``) is what keeps it exact.

Configs, side by side in one run, one request at a time:

* ``full``: stock SGLang with no prefix cache (every token computed): the reference;
* ``exact``: the ``holes`` radix cache without chunk hints (exact reuse; here only the
  shared instruction prefix in ``chat``, and in ``docs_first`` nothing unless the first
  passage stayed first, since the order changed);
* ``none`` / ``first_k`` / ``deviation`` / ``query`` (and ``query`` + each chunk's first
  tokens) at recompute ratios 5-30%: chunk mode;
* ``oracle`` (diagnostic, at the same ratios): knows the full-recompute KV and recomputes the
  reused tokens whose KV, over ALL layers, deviates most from it (computed in this process by
  ``LlamaStack`` from the model's weights, sent as an ``explicit`` recompute set). It is the
  ceiling of selecting by KV deviation, so it tells a selection problem from a model limit.

Metrics (per config, over all questions):

* recompute: ``recomputed_tokens / prompt_tokens`` from ``meta_info``;
* teacher-forced over the reference answer (``full``'s greedy ``--answer-tokens``, fed as input;
  logits of those positions via input logprobs): top-1 agreement (the config's argmax is
  ``full``'s token) and KL(full ‖ config) restricted to ``full``'s top-20 tokens at each
  position (that mass per config is in quality.json, key `mass`);
* greedy (``--greedy``): first-N-token exact match with ``full``; token F1 of the answer against the
  gold answers (SQuAD normalisation);
* TTFT: wall time of ``generate(max_new_tokens=1)``; speedup = full's median / config's median.

Writes quality.json, quality.md and quality.png.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import string
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from bench_startup import cpu_name  # benchmarks/ is on sys.path when run as a script
from quality_oracle import Oracle
from quality_report import SETTINGS, plot, summarize, write_table
from tqdm import tqdm

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "musique_s.json"
SYSTEM = "Answer the question using the passages. Reply with a short answer only."
RATIOS = (0.05, 0.10, 0.15, 0.20, 0.30)
# The default sweep (about 70 s per question on 2 CPU cores): query at every ratio, the others at fewer.
CHUNK_CONFIGS = ([("none", {}), ("first_k", {"k": 16})]
                 + [("query", {"ratio": r}) for r in RATIOS] + [("query", {"ratio": 0.10, "k": 4})]
                 + [("deviation", {"ratio": r}) for r in (0.10, 0.20)]
                 + [("oracle", {"ratio": r}) for r in (0.05, 0.10, 0.20)])
ANSWER_TOKENS = 32
TOP = 20


def label(policy: str, params: dict) -> str:
    if policy == "first_k":
        return f"first_k k={params['k']}"
    if "ratio" in params:
        extra = "".join(f" {k}={v}" for k, v in params.items() if k != "ratio")
        return f"{policy} {round(100 * params['ratio'])}%{extra}"
    return policy


def parse_config(text: str) -> tuple[str, dict]:
    """``none`` | ``first_k:K`` | ``deviation|query|oracle:RATIO[:k=K][:layers=L]`` -> (policy, params)."""
    policy, *values = text.strip().split(":")
    try:
        if policy == "first_k" and len(values) == 1:
            return policy, {"k": int(values[0])}
        if policy in ("deviation", "query", "oracle") and values:
            extra = dict(v.split("=", 1) for v in values[1:])
            if set(extra) - {"k", "layers"}:
                raise ValueError(extra)
            return policy, {"ratio": float(values[0]), **{k: int(v) for k, v in extra.items()}}
        if policy == "none" and not values:
            return policy, {}
    except ValueError:
        pass
    raise SystemExit(f"bad config {text!r}: none | first_k:K | deviation|query|oracle:RATIO[:k=K][:layers=L]")


def _normalize(text: str) -> list[str]:
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(pred: str, golds: list[str]) -> float:
    best = 0.0
    for gold in golds:
        p, g = _normalize(pred), _normalize(gold)
        common = sum((Counter(p) & Counter(g)).values())
        if common:
            prec, rec = common / len(p), common / len(g)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


class Built(NamedTuple):
    """One question's prompts in a setting: the request that stores the passages, and the evaluated one."""

    stored_ids: list[int]
    stored_chunks: list[tuple]
    ids: list[int]
    chunks: list[tuple]  # the passages' spans first (in ``order``), then any other chunk


class Prompts:
    """Token-level prompt assembly of each setting (``SETTINGS``)."""

    def __init__(self, tokenizer, passage_tokens: int) -> None:
        self.tok = tokenizer
        marker = "@@PASSAGES@@"
        text = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                              {"role": "user", "content": marker}],
                                             tokenize=False, add_generation_prompt=True)
        head, tail = text.split(marker)
        self.head, self.tail = self.enc(head), self.enc(tail)
        self.sep = self.enc("\n\n")
        self.passage_tokens = passage_tokens

    def enc(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def passages(self, item: dict) -> list[list[int]]:
        return [self.enc(c["text"])[: self.passage_tokens] for c in item["ctxs"]]

    def build(self, setting: str, passages: list[list[int]], first: list[int], second: list[int],
              question: str) -> Built:
        if setting == "chat":
            return Built(*self._chat(passages, first, question), *self._chat(passages, second, question))
        stored, stored_chunks = self._docs(passages, first)
        ids, chunks = self._docs(passages, second)
        q = self.enc(f"Question: {question}\nAnswer:")
        return Built(stored, stored_chunks, ids + q, [*chunks, (len(ids), len(ids) + len(q))])

    def _chat(self, passages: list[list[int]], order: list[int], question: str) -> tuple[list[int], list[tuple]]:
        """Passages are the chunks; the separators between them are not (always recomputed)."""
        ids, chunks = list(self.head), []
        for i in order:
            chunks.append((len(ids), len(ids) + len(passages[i])))
            ids += passages[i] + self.sep
        return ids + self.enc(f"Question: {question}") + self.tail, chunks

    def _docs(self, passages: list[list[int]], order: list[int]) -> tuple[list[int], list[tuple]]:
        ids, chunks = [], []
        for i in order:
            doc = passages[i] + self.sep
            chunks.append((len(ids), len(ids) + len(doc)))
            ids += doc
        return ids, chunks


def _engines(model: str):
    import sglang_holes

    common = dict(model_path=model, max_total_tokens=20000, chunked_prefill_size=16384, mem_fraction_static=0.5,
                  log_level="error", random_seed=0)
    full = sglang_holes.Engine(radix_cache_backend=None, disable_radix_cache=True, **common)
    holes = sglang_holes.Engine(**common)
    return full, holes


def _ttft(eng, **kw) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = eng.generate(sampling_params={"max_new_tokens": 1, "temperature": 0.0}, **kw)
    return time.perf_counter() - t0, out["meta_info"]


def _teacher_forced(eng, ids: list[int], answer: list[int], token_ids: list[int] | None, **kw) -> list:
    """Per answer position: (top-1 id, {token id: logprob} for ``token_ids`` or the top-20)."""
    out = eng.generate(input_ids=ids + answer, sampling_params={"max_new_tokens": 1, "temperature": 0.0},
                       return_logprob=True, logprob_start_len=len(ids) - 1, top_logprobs_num=TOP,
                       token_ids_logprob=token_ids, **kw)
    meta = out["meta_info"]
    # Entry 0 is the last prompt token (no logprob); entry j >= 1 predicts answer[j - 1].
    tops = meta["input_top_logprobs"][1:]
    ids_lp = (meta.get("input_token_ids_logprobs") or [])[1:]
    assert len(tops) == len(answer), (len(tops), len(answer))
    rows = []
    for j, top in enumerate(tops):
        dist = {t[1]: t[0] for t in (ids_lp[j] if token_ids is not None else top)}
        rows.append((top[0][1], dist))
    return rows


def evaluate(args, chunk_configs: list[tuple[str, dict]]) -> dict:
    from sglang_holes.model import resolve_model_path
    from sglang_holes.patches.launch.engine import shutdown_all

    data = json.loads(DATA.read_text())[: args.questions]
    model_dir = resolve_model_path(None)
    oracle = Oracle(model_dir) if any(p == "oracle" for p, _ in chunk_configs) else None
    full, holes = _engines(model_dir)
    prompts = Prompts(holes.tokenizer_manager.tokenizer, args.passage_tokens)
    names = ["full", "exact"] + [label(p, k) for p, k in chunk_configs]
    per = {setting: {n: {"ttft": [], "recompute": [], "top1": [], "kl": [], "mass": [], "match32": [], "f1": [],
                         "n": []} for n in names} for setting in args.settings}
    try:
        for setting in args.settings:
            rng = random.Random(args.seed)  # the same orders in every setting
            for item in tqdm(data, desc=f"questions ({setting})", unit="q"):
                _question(args, setting, item, rng, prompts, full, [holes], oracle, chunk_configs, [per[setting]])
    finally:
        shutdown_all([full, holes])
    return {"per": per, "questions": len(data)}


def _question(args, setting: str, item: dict, rng: random.Random, prompts: Prompts, full, holes: list, oracle,
              chunk_configs: list[tuple[str, dict]], pers: list[dict]) -> None:
    """One question of one setting: the full-recompute reference once, then on each engine of
    ``holes`` (results into the same index of ``pers``): store the passages in one order, then
    every config in another."""
    passages = prompts.passages(item)
    first = list(range(len(passages)))
    rng.shuffle(first)
    second = first[:]
    while second == first:
        rng.shuffle(second)
    b = prompts.build(setting, passages, first, second, item["question"])

    # Reference: full recompute.
    ids = b.ids
    ref = full.generate(input_ids=ids, sampling_params={"max_new_tokens": args.answer_tokens, "temperature": 0.0})
    answer = ref["output_ids"]
    ref_rows = _teacher_forced(full, ids, answer, None)
    vocab = sorted({t for _, d in ref_rows for t in d})
    dt, meta = _ttft(full, input_ids=ids)
    for per in pers:
        _record(per["full"], dt, meta, ref_rows, ref_rows, answer, ref, item, args.answer_tokens)

    passage_chunks = b.chunks[: len(second)]
    dev = oracle.deviation(b.stored_ids, b.stored_chunks, first, ids, passage_chunks, second) if oracle else None
    where = _OracleInputs(b, first, second) if oracle else None
    configs = [("exact", None)] + [(label(p, k), _envelope(b.chunks, p, k, dev, where)) for p, k in chunk_configs]
    for eng, per in zip(holes, pers, strict=True):
        _store(eng, b)
        for name, hints in configs:
            kw = {"kv_hints": hints} if hints else {}
            # (exact: after the timed request the tree holds this prompt; its quality is exact either way)
            dt, meta = _ttft(eng, input_ids=ids, **kw)
            gen = eng.generate(input_ids=ids, sampling_params={"max_new_tokens": args.answer_tokens,
                                                               "temperature": 0.0}, **kw) if args.greedy else None
            rows = _teacher_forced(eng, ids, answer, vocab, **kw)
            _record(per[name], dt, meta, ref_rows, rows, answer, gen, item, args.answer_tokens)


def _store(holes, b: Built) -> None:
    """A fresh cache holding the passages as stored in the first order: chunks and the exact tree."""
    from sglang_holes.chunks.hints import chunk_envelope

    holes.flush_cache()
    holes.generate(input_ids=b.stored_ids, kv_hints=chunk_envelope(b.stored_chunks, "none"),
                   sampling_params={"max_new_tokens": 1})  # stores the 10 passages
    holes.generate(input_ids=b.stored_ids, sampling_params={"max_new_tokens": 1})  # the exact tree's copy


class _OracleInputs(NamedTuple):
    built: Built
    first: list[int]
    second: list[int]

    def sink(self):
        """The server's attention sink for this prompt (same setting, same rule: ``ChunkReuse._sink``)."""
        from sglang_holes.chunks.hints import Sink
        from sglang_holes.config import HolesConfig

        tokens = HolesConfig.build().chunk_sink_tokens
        b = self.built
        exact = []
        for i, (s, _) in enumerate(b.chunks):
            stored = i < len(self.second) and b.stored_chunks[self.first.index(self.second[i])][0] == s
            exact.append(stored and s < tokens and b.ids[:s] == b.stored_ids[:s])
        return Sink(tokens, tuple(exact))


def _envelope(chunks: list[tuple], policy: str, params: dict, dev, where: _OracleInputs | None) -> dict:
    from sglang_holes.chunks.hints import chunk_envelope

    if policy == "oracle":
        reused = [i < len(where.second) for i in range(len(chunks))]
        spans = Oracle.recompute_spans(dev, chunks, params["ratio"], reused, where.sink())
        return chunk_envelope(chunks, "explicit", recompute=spans)
    return chunk_envelope(chunks, policy, **params)


def _record(acc: dict, dt: float, meta: dict, ref_rows: list, rows: list, answer: list[int], gen: dict,
            item: dict, answer_tokens: int) -> None:
    acc["ttft"].append(dt)
    acc["n"].append(meta["prompt_tokens"])
    acc["recompute"].append(meta.get("recomputed_tokens", meta["prompt_tokens"] - meta["cached_tokens"])
                            / meta["prompt_tokens"])
    for tok, (_, p), (top1, q) in zip(answer, ref_rows, rows, strict=True):
        acc["top1"].append(float(top1 == tok))
        acc["mass"].append(sum(math.exp(v) for v in p.values()))
        acc["kl"].append(sum(math.exp(lp) * (lp - q.get(t, -30.0)) for t, lp in p.items()))
    if gen is not None:  # greedy generation (full always; chunk configs with --greedy)
        acc["match32"].append(float(gen["output_ids"][:answer_tokens] == answer[:answer_tokens]))
        acc["f1"].append(token_f1(gen["text"], item["answers"]))


def main() -> None:
    import sys

    from sglang_holes.config import HolesConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--passage-tokens", type=int, default=150)
    ap.add_argument("--answer-tokens", type=int, default=ANSWER_TOKENS,
                    help="reference answer tokens (greedy from full) scored teacher-forced")
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help=f"prompt shapes, comma-separated: {', '.join(SETTINGS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default=None,
                    help="chunk configs instead of the default sweep, e.g. 'none,first_k:140,deviation:0.9'")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="quality", help="stem of the output files")
    ap.add_argument("--greedy", action="store_true",
                    help="also generate the answer greedily per config (first-N match, F1): slower")
    args = ap.parse_args()
    args.settings = [x.strip() for x in args.settings.split(",")]
    if unknown := set(args.settings) - set(SETTINGS):
        raise SystemExit(f"unknown settings {sorted(unknown)}; expected some of {list(SETTINGS)}")
    if not DATA.exists():
        raise SystemExit(f"{DATA} not found (the MuSiQue sample lives in ../shared/data)")
    configs = [parse_config(c) for c in args.configs.split(",")] if args.configs else CHUNK_CONFIGS
    result = evaluate(args, configs)
    rows = summarize(result["per"])
    sizes = [n for configs_ in result["per"].values() for n in configs_["full"]["n"]]
    meta = {"machine": cpu_name(), "questions": result["questions"], "passage_tokens": args.passage_tokens,
            "answer_tokens": args.answer_tokens, "sink_tokens": HolesConfig.build().chunk_sink_tokens,
            "command": "python benchmarks/" + " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv)),
            "prompt_tokens_min": min(sizes), "prompt_tokens_max": max(sizes)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "per": result["per"]},
                                                         indent=1))
    write_table(rows, meta, args.out / f"{args.name}.md")
    plot(rows, args.out / f"{args.name}.png", f"{meta['questions']} MuSiQue questions, passages of "
         f"{meta['passage_tokens']} tokens, SmolLM2-135M")
    print((args.out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
