"""How many leading positions the attention sink needs: chunk reuse quality vs the sink size.

    .venv/bin/python benchmarks/bench_sink.py [--questions 20] [--sinks 1,2,4,8,16]

The documents-first prompts of ``bench_quality.py`` (no system prompt: a moved document at
position 0), one holes engine per sink size (``SGLANG_HOLES_CHUNK_SINK_TOKENS``), ``none`` and
``query`` 15% against full recompute, teacher-forced over the reference answer. Sink 0 (the KV
of a token computed mid-sequence serving position 0) is what the server did before the rule; it
is no longer a setting, so its row is issue #20's measurement on the same prompts. Writes
sink.md / sink.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from pathlib import Path

from bench_quality import DATA, Prompts, _question, label, parse_config
from bench_startup import cpu_name
from tqdm import tqdm

CONFIGS = ("none", "query:0.15")
# Issue #20's table (30 questions, passages of 120 tokens, 12 answer tokens): the server before the rule.
BEFORE = {"none": (0.934, 0.025), "query 15%": (0.675, 0.171)}


def _summary(per: dict) -> dict:
    return {n: {"top1": statistics.mean(a["top1"]), "kl": statistics.mean(a["kl"]),
                "recompute": statistics.mean(a["recompute"])} for n, a in per.items() if n not in ("full", "exact")}


def _holes_engine(sink: int, model_dir: str):
    import sglang_holes
    from sglang_holes.config import ENV_CHUNK_SINK_TOKENS

    os.environ[ENV_CHUNK_SINK_TOKENS] = str(sink)  # read by the engine's scheduler process at start
    try:
        return sglang_holes.Engine(model_path=model_dir, max_total_tokens=20000, chunked_prefill_size=16384,
                                   mem_fraction_static=0.5, log_level="error", random_seed=0)
    finally:
        del os.environ[ENV_CHUNK_SINK_TOKENS]


def main() -> None:
    import sglang_holes
    from sglang_holes.model import resolve_model_path
    from sglang_holes.patches.launch.engine import shutdown_all

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--passage-tokens", type=int, default=120)
    ap.add_argument("--answer-tokens", type=int, default=12)
    ap.add_argument("--sinks", default="1,2,4,8,16")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    args.greedy = False
    data = json.loads(DATA.read_text())[: args.questions]
    model_dir = resolve_model_path(None)
    sinks = [int(x) for x in args.sinks.split(",")]
    configs = [parse_config(c) for c in args.configs.split(",")]
    names = ["full", "exact"] + [label(p, k) for p, k in configs]
    # Every engine up front: shutting one down kills every SGLang process of this one.
    engines = [sglang_holes.Engine(model_path=model_dir, radix_cache_backend=None, disable_radix_cache=True,
                                   max_total_tokens=20000, chunked_prefill_size=16384, mem_fraction_static=0.5,
                                   log_level="error", random_seed=0)]
    try:
        engines += [_holes_engine(s, model_dir) for s in sinks]
        pers = [{n: {k: [] for k in ("ttft", "recompute", "top1", "kl", "mass", "match32", "f1", "n")} for n in names}
                for _ in sinks]
        prompts = Prompts(engines[0].tokenizer_manager.tokenizer, args.passage_tokens)
        rng = random.Random(args.seed)
        for item in tqdm(data, desc=f"questions (sinks {args.sinks})", unit="q"):
            _question(args, "docs_first", item, rng, prompts, engines[0], engines[1:], None, configs, pers)
    finally:
        shutdown_all(engines)
    result = {s: _summary(per) for s, per in zip(sinks, pers, strict=True)}
    command = "python benchmarks/" + " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))
    names = list(next(iter(result.values())))
    lines = [f"Machine: {cpu_name()}. {len(data)} MuSiQue questions, documents-first prompts (10 passages of "
             f"{args.passage_tokens} tokens, each a chunk, then the question as the last chunk), SmolLM2-135M fp32; "
             f"top-1 agreement and KL(full || config) over the first {args.answer_tokens} answer tokens, "
             f"teacher-forced. Command: `{command}`.", "",
             "Row 0 is issue #20's measurement of the server before the rule (sink 0 is no longer a setting), on its "
             "own 30 questions and prompt assembly: compare `query` with `none` within a row, not across rows.", "",
             "| sink positions | " + " | ".join(f"{n}: top-1, KL, recomputed" for n in names) + " |",
             "|---:|" + "---:|" * len(names)]
    before = " | ".join(f"{100 * BEFORE[n][0]:.1f}%, –, {100 * BEFORE[n][1]:.1f}%" if n in BEFORE else "–"
                        for n in names)
    lines.append(f"| 0 (before; issue #20, 30 questions) | {before} |")
    for sink, rows in result.items():
        lines.append(f"| {sink} | " + " | ".join(f"{100 * r['top1']:.1f}%, {r['kl']:.3f}, {100 * r['recompute']:.1f}%"
                                                 for r in rows.values()) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sink.json").write_text(json.dumps({"command": command, "machine": cpu_name(), "rows": result},
                                                   indent=1))
    (args.out / "sink.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
