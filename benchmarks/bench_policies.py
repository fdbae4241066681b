"""Eviction policies end to end: the same multi-session stream through a small-pool server, per policy.

    .venv/bin/python benchmarks/bench_policies.py [--sessions 6] [--turns 8] [--pools 5000 2500] [--out ...]

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

Per policy and pool: prompt tokens computed (``prompt_tokens - cached_tokens``) and their FLOPs
(the spans of ``meta_info["hole_spans"]``), next to what the simulator predicts for the same
stream (``policy_replay.replay``), requests whose computed tokens the simulator predicted exactly,
hole requests, and TTFT (wall time of a 1-token generate), mean and p90. Writes policies.json,
policies.md and policies.png.
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
from policy_replay import replay, span_flops
from tqdm import tqdm

from sglang_holes.cache.recompute_cost import SMOLLM2_135M

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


def run(policy: str, model: str, requests: list[list[int]], pool: int, chunk: int = 4096) -> dict:
    """One engine serving ``requests`` in order, and the replay of the same stream (``chunk``: SGLang's
    chunked-prefill size, 4,096 by default on this CPU, given to both)."""
    import sglang_holes
    from sglang_holes.patches.launch.engine import shutdown_all

    eng = sglang_holes.Engine(model_path=model, radix_eviction_policy=policy, max_total_tokens=pool,
                              chunked_prefill_size=chunk, log_level="error", random_seed=0)
    ttft, computed, flops = [], [], []
    try:
        eng.generate(input_ids=requests[0][:64], sampling_params=ONE)  # warm-up, then start clean
        eng.flush_cache()
        for ids in tqdm(requests, desc=f"{policy} @ {pool}", unit="req"):
            t0 = time.perf_counter()
            meta = eng.generate(input_ids=ids, sampling_params=ONE)["meta_info"]
            ttft.append(time.perf_counter() - t0)
            computed.append(meta["prompt_tokens"] - meta["cached_tokens"])
            flops.append(span_flops(meta["hole_spans"], SMOLLM2_135M))  # the spans the engine computed
        stats = eng.get_server_info()["internal_states"][0]["sglang_holes"]["cache"]["stats"]
    finally:
        shutdown_all([eng])
    sim = replay(policy, requests, pool, SMOLLM2_135M, chunk)
    ordered = sorted(ttft)
    return {"policy": policy, "pool": pool, "requests": len(requests), "prompt_tokens": sum(map(len, requests)),
            "computed_tokens": sum(computed), "flops": sum(flops), "hole_requests": stats["hole_requests"],
            "sim_computed_tokens": sum(o.computed for o in sim), "sim_flops": sum(o.flops for o in sim),
            "sim_hole_requests": sum(o.holes for o in sim),
            "requests_agreeing": sum(o.computed == c for o, c in zip(sim, computed, strict=True)),
            "ttft_mean_s": statistics.fmean(ttft), "ttft_p90_s": ordered[int(0.9 * (len(ordered) - 1))],
            "ttft_s": ttft, "computed": computed, "replay_per_request": [o.computed for o in sim]}


NOTES = "Reading it"  # where the hand-written reading of a results file starts


def write_keeping_notes(path: Path, lines: list[str]) -> None:
    """Write a report's generated ``lines``, keeping the hand-written reading of the file it replaces (from
    its "Reading it" paragraph on), which a re-run cannot write."""
    old = path.read_text() if path.exists() else ""
    notes = old[old.find(NOTES):] if NOTES in old else ""
    path.write_text("\n".join(lines) + "\n" + (f"\n{notes}" if notes else ""))


def write(rows: list[dict], machine: str, args: argparse.Namespace) -> None:
    lines = [f"Machine: {machine}. `python benchmarks/bench_policies.py --sessions {args.sessions} "
             f"--turns {args.turns} --pools {' '.join(map(str, args.pools))}` (one run, the same stream for every "
             "policy and pool; prompt FLOPs = attention + linear layers of the computed spans, "
             "`RecomputeCost` of SmolLM2-135M; simulator: `benchmarks/policy_replay.py` on the same stream).", "",
             "| pool | policy | computed tokens: engine / simulator | prompt TFLOP: engine / simulator | "
             "FLOPs vs lru | requests agreeing | hole requests | TTFT mean s | TTFT p90 s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["pool"] == r["pool"] and b["policy"] == "lru")
        lines.append(f"| {r['pool']} | {r['policy']} | {r['computed_tokens']} / {r['sim_computed_tokens']} | "
                     f"{r['flops'] / 1e12:.2f} / {r['sim_flops'] / 1e12:.2f} | {r['flops'] / base['flops']:.3f}x | "
                     f"{r['requests_agreeing']}/{r['requests']} | {r['hole_requests']} / {r['sim_hole_requests']} | "
                     f"{r['ttft_mean_s']:.3f} | {r['ttft_p90_s']:.3f} |")
    write_keeping_notes(args.out / "policies.md", [*lines, "", "![TTFT per request, sorted](policies.png)"])
    (args.out / "policies.json").write_text(json.dumps({"machine": machine, "args": {
        k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.pools), figsize=(6 * len(args.pools), 4), squeeze=False)
    for ax, pool in zip(axes[0], args.pools, strict=True):
        for r in (r for r in rows if r["pool"] == pool):
            ax.plot(range(1, len(r["ttft_s"]) + 1), sorted(r["ttft_s"]), label=f"{r['policy']} "
                    f"({r['flops'] / 1e12:.2f} TFLOP computed)")
        ax.set_xlabel("requests, sorted by TTFT")
        ax.set_ylabel("TTFT (s)")
        ax.set_title(f"pool of {pool} tokens")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "policies.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=6)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--pools", type=int, nargs="+", default=[5000, 2500],
                    help="KV pool sizes in tokens (max_total_tokens)")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    from sglang_holes.model import prepare_embedded_model

    model = str(prepare_embedded_model())
    requests = stream(args.sessions, args.turns)
    rows = [run(p, model, requests, pool) for pool in args.pools for p in args.policies]
    machine = f"{cpu_name()}, {os.cpu_count()} cores, CPU only (torch_native, fp32), SmolLM2-135M"
    args.out.mkdir(parents=True, exist_ok=True)
    write(rows, machine, args)
    print((args.out / "policies.md").read_text())


if __name__ == "__main__":
    main()
