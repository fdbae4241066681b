"""Eviction policies end to end: the same multi-session stream through a small-pool server, per policy.

    .venv/bin/python benchmarks/bench_policies.py [--sessions 6] [--turns 8] [--pool 5000] [--out benchmarks/results]

One real engine per policy (embedded SmolLM2-135M, CPU, torch_native, fp32, the ``holes``
cache, SGLang's default chunked prefill), started one after the other, serves the same
request stream: ``--sessions`` chat sessions over long documents (a shared 200-token system
prompt, a 1,500-token document per session, then turns of a 40-token question and an
8-token answer), interleaved in a seeded random order. The pool (``--pool`` tokens) holds
well under half of the sessions' contexts, so the cache evicts all the time:

* ``lru``: SGLang's own, leaves only, least recently used first (evicting what SGLang's cache
  evicts; the results of 2026-11-26 ran ``lru-leaf``, this project's earlier equivalent): the
  cache stays prefix-closed;
* ``cost-aware``: the cheapest expected recompute per freed slot, anywhere: it punches
  holes at the start of documents and keeps their expensive tails, which later requests
  refill as holes.

Per policy: prompt tokens computed (``prompt_tokens - cached_tokens`` summed over
requests), requests that ran as hole requests, and TTFT (wall time of a 1-token
generate), mean and p90. Writes policies.json, policies.md and policies.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

from bench_startup import cpu_name  # benchmarks/ is on sys.path when run as a script
from tqdm import tqdm

POLICIES = ("lru", "cost-aware")
ONE = {"max_new_tokens": 1, "temperature": 0.0}


def stream(sessions: int, turns: int, seed: int = 0) -> list[list[int]]:
    """The request stream: each request is the full prompt of one turn of one session."""
    rng = random.Random(seed)
    vocab = lambda n: [rng.randrange(3, 40000) for _ in range(n)]  # noqa: E731
    system = vocab(200)
    history = {s: system + vocab(1500) for s in range(sessions)}
    order = [s for s in range(sessions) for _ in range(turns)]
    rng.shuffle(order)
    out = []
    for s in order:
        history[s] = history[s] + vocab(40)  # the question
        out.append(list(history[s]))
        history[s] = history[s] + vocab(8)  # the answer, part of the next turn's prompt
    return out


def run(policy: str, model: str, requests: list[list[int]], pool: int) -> dict:
    import sglang_holes
    from sglang_holes.patches.launch.engine import shutdown_all

    eng = sglang_holes.Engine(model_path=model, radix_eviction_policy=policy, max_total_tokens=pool,
                              log_level="error", random_seed=0)
    ttft, computed = [], 0
    try:
        eng.generate(input_ids=requests[0][:64], sampling_params=ONE)  # warm-up, then start clean
        eng.flush_cache()
        for ids in tqdm(requests, desc=policy, unit="req"):
            t0 = time.perf_counter()
            meta = eng.generate(input_ids=ids, sampling_params=ONE)["meta_info"]
            ttft.append(time.perf_counter() - t0)
            computed += meta["prompt_tokens"] - meta["cached_tokens"]
        stats = eng.get_server_info()["internal_states"][0]["sglang_holes"]["cache"]["stats"]
    finally:
        shutdown_all([eng])
    ordered = sorted(ttft)
    return {"policy": policy, "requests": len(requests), "prompt_tokens": sum(map(len, requests)),
            "computed_tokens": computed, "hole_requests": stats["hole_requests"],
            "ttft_mean_s": statistics.fmean(ttft), "ttft_p90_s": ordered[int(0.9 * (len(ordered) - 1))],
            "ttft_s": ttft}


def write(rows: list[dict], machine: str, args: argparse.Namespace) -> None:
    base = rows[0]
    lines = [f"Machine: {machine}. `python benchmarks/bench_policies.py --sessions {args.sessions} "
             f"--turns {args.turns} --pool {args.pool}` (one run, same stream for every policy).", "",
             "| policy | requests | prompt tokens | computed tokens | vs lru | hole requests | TTFT mean s "
             "| TTFT p90 s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['requests']} | {r['prompt_tokens']} | {r['computed_tokens']} | "
                     f"{r['computed_tokens'] / base['computed_tokens']:.2f}x | {r['hole_requests']} | "
                     f"{r['ttft_mean_s']:.3f} | {r['ttft_p90_s']:.3f} |")
    (args.out / "policies.md").write_text("\n".join(lines) + "\n")
    (args.out / "policies.json").write_text(json.dumps({"machine": machine, "args": {
        k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ax.plot(range(1, len(r["ttft_s"]) + 1), sorted(r["ttft_s"]), label=f"{r['policy']} "
                f"({r['computed_tokens']} tokens computed)")
    ax.set_xlabel("requests, sorted by TTFT")
    ax.set_ylabel("TTFT (s)")
    ax.set_title(f"Same stream, pool of {args.pool} tokens: eviction policies")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "policies.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=6)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--pool", type=int, default=5000, help="KV pool size in tokens (max_total_tokens)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    from sglang_holes.model import prepare_embedded_model

    model = str(prepare_embedded_model())
    requests = stream(args.sessions, args.turns)
    rows = [run(p, model, requests, args.pool) for p in POLICIES]
    machine = f"{cpu_name()}, {os.cpu_count()} cores, CPU only (torch_native, fp32), SmolLM2-135M"
    args.out.mkdir(parents=True, exist_ok=True)
    write(rows, machine, args)
    print((args.out / "policies.md").read_text())


if __name__ == "__main__":
    main()
