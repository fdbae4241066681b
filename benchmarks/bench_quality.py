"""RAG chunk reuse: answer quality vs recomputed tokens, and TTFT, on MuSiQue (real engine, CPU).

    .venv/bin/python benchmarks/bench_quality.py [--questions 30] [--passage-tokens 150] [--configs none,first_k:16,...]

Workload: ../shared/data/musique_s.json, 10 passages per question, chat-formatted for
the embedded SmolLM2-135M-Instruct. Passages are truncated to ``--passage-tokens``
tokens for CPU time only (the model's 8k context would hold them whole). For each
question the passages are first sent in one shuffled order (a chunk request that stores
every passage, and the same prompt without hints for the exact tree), then evaluated in
ANOTHER order, so reuse is non-prefix. Passages are the chunks; the instruction, the
``\n\n`` separators and the question never are (always recomputed).

Configs, side by side in one run, one request at a time:

* ``full``: stock SGLang with no prefix cache (every token computed): the reference;
* ``exact``: the ``holes`` radix cache without chunk hints (exact reuse; here only the
  shared instruction prefix, since the order changed);
* ``none`` / ``first_k`` (k = 4, 16, 32) / ``deviation`` (5-30%): chunk mode.

Metrics (per config, over all questions):

* recompute: ``recomputed_tokens / prompt_tokens`` from ``meta_info``;
* teacher-forced over the reference answer (``full``'s greedy 32 tokens, fed as input;
  logits of those positions via input logprobs): top-1 agreement (the config's argmax is
  ``full``'s token) and KL(full ‖ config) restricted to ``full``'s top-20 tokens at each
  position (that mass per config is in quality.json, key `mass`);
* greedy: first-32-token exact match with ``full``; token F1 of the answer against the
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
import statistics
import string
import time
from collections import Counter
from pathlib import Path

from bench_startup import cpu_name  # benchmarks/ is on sys.path when run as a script
from tqdm import tqdm

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "musique_s.json"
SYSTEM = "Answer the question using the passages. Reply with a short answer only."
CHUNK_CONFIGS = [("none", {}), ("first_k", {"k": 4}), ("first_k", {"k": 16}), ("first_k", {"k": 32}),
                 ("deviation", {"ratio": 0.05}), ("deviation", {"ratio": 0.10}), ("deviation", {"ratio": 0.20}),
                 ("deviation", {"ratio": 0.30})]
ANSWER_TOKENS = 32
TOP = 20


def label(policy: str, params: dict) -> str:
    if policy == "first_k":
        return f"first_k k={params['k']}"
    if policy == "deviation":
        return f"deviation {round(100 * params['ratio'])}%"
    return policy


def parse_config(text: str) -> tuple[str, dict]:
    """``none`` | ``first_k:K`` | ``deviation:RATIO`` -> (policy, params)."""
    policy, _, value = text.strip().partition(":")
    if policy == "first_k":
        return policy, {"k": int(value)}
    if policy == "deviation":
        return policy, {"ratio": float(value)}
    if policy == "none" and not value:
        return policy, {}
    raise SystemExit(f"bad config {text!r}: none | first_k:K | deviation:RATIO")


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


class Prompts:
    """Token-level prompt assembly: chat head, passages (the chunks), question, chat tail."""

    def __init__(self, tokenizer, passage_tokens: int) -> None:
        self.tok = tokenizer
        marker = "@@PASSAGES@@"
        text = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                              {"role": "user", "content": marker}],
                                             tokenize=False, add_generation_prompt=True)
        head, tail = text.split(marker)
        self.head, self.tail = self.enc(head), self.enc(tail)
        self.passage_tokens = passage_tokens

    def enc(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def passages(self, item: dict) -> list[list[int]]:
        return [self.enc(c["text"])[: self.passage_tokens] for c in item["ctxs"]]

    def build(self, passages: list[list[int]], order: list[int], question: str) -> tuple[list[int], list[tuple]]:
        """Passages are the chunks; the separators between them are not (always recomputed)."""
        ids, chunks, sep = list(self.head), [], self.enc("\n\n")
        for i in order:
            chunks.append((len(ids), len(ids) + len(passages[i])))
            ids += passages[i] + sep
        ids += self.enc(f"Question: {question}") + self.tail
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
    from sglang_holes.chunks.hints import chunk_envelope
    from sglang_holes.model import resolve_model_path
    from sglang_holes.patches.engine import shutdown_all

    data = json.loads(DATA.read_text())[: args.questions]
    full, holes = _engines(resolve_model_path(None))
    prompts = Prompts(holes.tokenizer_manager.tokenizer, args.passage_tokens)
    rng = random.Random(args.seed)
    names = ["full", "exact"] + [label(p, k) for p, k in chunk_configs]
    per: dict[str, dict[str, list]] = {n: {"ttft": [], "recompute": [], "top1": [], "kl": [], "mass": [],
                                           "match32": [], "f1": [], "n": []} for n in names}
    try:
        for item in tqdm(data, desc="questions", unit="q"):
            passages = prompts.passages(item)
            first = list(range(len(passages)))
            rng.shuffle(first)
            second = first[:]
            while second == first:
                rng.shuffle(second)
            ids1, chunks1 = prompts.build(passages, first, item["question"])
            ids, chunks = prompts.build(passages, second, item["question"])
            holes.flush_cache()
            holes.generate(input_ids=ids1, kv_hints=chunk_envelope(chunks1, "none"),
                           sampling_params={"max_new_tokens": 1})  # stores the 10 passages
            holes.generate(input_ids=ids1, sampling_params={"max_new_tokens": 1})  # the exact tree's copy

            # Reference: full recompute.
            ref = full.generate(input_ids=ids, sampling_params={"max_new_tokens": ANSWER_TOKENS, "temperature": 0.0})
            answer = ref["output_ids"]
            ref_rows = _teacher_forced(full, ids, answer, None)
            vocab = sorted({t for _, d in ref_rows for t in d})
            dt, meta = _ttft(full, input_ids=ids)
            _record(per["full"], dt, meta, ref_rows, ref_rows, answer, ref, item)

            configs = [("exact", None)] + [(label(p, k), chunk_envelope(chunks, p, **k)) for p, k in chunk_configs]
            for name, hints in configs:
                kw = {"kv_hints": hints} if hints else {}
                # (exact: after the timed request the tree holds this prompt; its quality is exact either way)
                dt, meta = _ttft(holes, input_ids=ids, **kw)
                gen = holes.generate(input_ids=ids, sampling_params={"max_new_tokens": ANSWER_TOKENS,
                                                                     "temperature": 0.0}, **kw)
                rows = _teacher_forced(holes, ids, answer, vocab, **kw)
                _record(per[name], dt, meta, ref_rows, rows, answer, gen, item)
    finally:
        shutdown_all([full, holes])
    return {"per": per, "questions": len(data)}


def _record(acc: dict, dt: float, meta: dict, ref_rows: list, rows: list, answer: list[int], gen: dict,
            item: dict) -> None:
    acc["ttft"].append(dt)
    acc["n"].append(meta["prompt_tokens"])
    acc["recompute"].append(meta.get("recomputed_tokens", meta["prompt_tokens"] - meta["cached_tokens"])
                            / meta["prompt_tokens"])
    for tok, (_, p), (top1, q) in zip(answer, ref_rows, rows, strict=True):
        acc["top1"].append(float(top1 == tok))
        acc["mass"].append(sum(math.exp(v) for v in p.values()))
        acc["kl"].append(sum(math.exp(lp) * (lp - q.get(t, -30.0)) for t, lp in p.items()))
    acc["match32"].append(float(gen["output_ids"][:ANSWER_TOKENS] == answer[:ANSWER_TOKENS]))
    acc["f1"].append(token_f1(gen["text"], item["answers"]))


def summarize(per: dict) -> list[dict]:
    full_ttft = statistics.median(per["full"]["ttft"])
    rows = []
    for name, acc in per.items():
        if not acc["ttft"]:
            continue
        rows.append({"config": name, "recompute": statistics.mean(acc["recompute"]),
                     "top1": statistics.mean(acc["top1"]), "kl": statistics.mean(acc["kl"]),
                     "mass": statistics.mean(acc["mass"]), "match32": statistics.mean(acc["match32"]),
                     "f1": statistics.mean(acc["f1"]), "ttft_s": statistics.median(acc["ttft"]),
                     "speedup": full_ttft / statistics.median(acc["ttft"]),
                     "paired_speedup": statistics.median(f / t for f, t in zip(per["full"]["ttft"], acc["ttft"],
                                                                               strict=True))})
    return rows


def write_table(rows: list[dict], meta: dict, path: Path) -> None:
    lines = [f"Machine: {meta['machine']}. {meta['questions']} MuSiQue questions, 10 passages each truncated to "
             f"{meta['passage_tokens']} tokens (prompts {meta['prompt_tokens_min']}-{meta['prompt_tokens_max']} "
             f"tokens), SmolLM2-135M-Instruct fp32, torch_native. Command: `{meta['command']}`.", "",
             "| config | recomputed | top-1 | KL (top-20) | first-32 match | F1 | TTFT (median) | speedup vs full |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {100 * r['recompute']:.1f}% | {100 * r['top1']:.1f}% | {r['kl']:.3f} | "
                     f"{100 * r['match32']:.0f}% | {r['f1']:.3f} | {1000 * r['ttft_s']:.0f} ms | "
                     f"{r['speedup']:.2f}x |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = {"first_k": "tab:blue", "deviation": "tab:orange"}
    for prefix, color in groups.items():
        pts = sorted((r["recompute"], r) for r in rows if r["config"].startswith(prefix))
        a.plot([100 * x for x, _ in pts], [100 * r["top1"] for _, r in pts], "o-", color=color, label=prefix)
        b.plot([100 * x for x, _ in pts], [r["speedup"] for _, r in pts], "o-", color=color, label=prefix)
        for x, r in pts:
            a.annotate(r["config"].split(" ", 1)[1], (100 * x, 100 * r["top1"]), fontsize=7,
                       xytext=(3, -9), textcoords="offset points")
    for name, marker, color in (("none", "s", "tab:red"), ("exact", "^", "tab:green"), ("full", "D", "black")):
        r = next(r for r in rows if r["config"] == name)
        a.plot(100 * r["recompute"], 100 * r["top1"], marker, color=color, label=name)
        b.plot(100 * r["recompute"], r["speedup"], marker, color=color, label=name)
    a.axhline(95, ls=":", color="grey")
    a.axvline(20, ls=":", color="grey")
    a.set(xlabel="recomputed prompt tokens (%)", ylabel="teacher-forced top-1 agreement with full (%)",
          title="Quality vs recompute")
    b.axhline(3, ls=":", color="grey")
    b.set(xlabel="recomputed prompt tokens (%)", ylabel="TTFT speedup vs full recompute (x)", title="Speed")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--passage-tokens", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default=None,
                    help="chunk configs instead of the default sweep, e.g. 'none,first_k:140,deviation:0.9'")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="quality", help="stem of the output files")
    args = ap.parse_args()
    if not DATA.exists():
        raise SystemExit(f"{DATA} not found (the MuSiQue sample lives in ../shared/data)")
    configs = [parse_config(c) for c in args.configs.split(",")] if args.configs else CHUNK_CONFIGS
    result = evaluate(args, configs)
    rows = summarize(result["per"])
    meta = {"machine": cpu_name(), "questions": result["questions"], "passage_tokens": args.passage_tokens,
            "command": "python benchmarks/" + " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv)),
            "prompt_tokens_min": min(result["per"]["full"]["n"]), "prompt_tokens_max": max(result["per"]["full"]["n"])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "per": result["per"]},
                                                         indent=1))
    write_table(rows, meta, args.out / f"{args.name}.md")
    if args.configs is None:
        plot(rows, args.out / f"{args.name}.png")
    print((args.out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
