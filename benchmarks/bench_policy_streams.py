"""Eviction policies on streams that stand for real use, at 10-50% cache: prompt FLOPs per policy.

    .venv/bin/python benchmarks/bench_policy_streams.py [--requests 150] [--fractions 0.1 0.25 0.5]
        [--holdout-seeds 20 21 22 23] [--engine chat agent rag --engine-requests 40 --engine-fraction 0.25
        --engine-policies lru lfu slru cost-aware] [--engine-only NAME]

Streams (fixed seeds; answers join the next prompt of their session, generations are 1 token):

* ``chat``: a shared 256-token system prompt; 16 sessions over a document of 1k-6k tokens
  (log-uniform), turns of a 40-token question and a 60-token answer; Zipf(1.1) popularity (its 150
  requests grow past SmolLM2's 8k context, which only the replay serves; the engine's first 40
  stay under 7.2k).
* ``agent``: 6 agents after the shared prompt, each step appending a 200-1,500-token tool output
  and a 60-token action; Zipf(1.1) over agents; an agent starts afresh past 6k tokens (so every
  prompt fits the served model's 8k context).
* ``rag``: the shared prompt, then 4 of 60 documents (300-1,000 tokens, Zipf(1.0)) in random
  order, then a 40-token question.

The pool is a fraction of the stream's distinct tokens (at least its longest prompt). Every
policy is replayed with ``policy_replay.replay``, which predicts the ``holes`` engine request by
request (``policies.md``: 48/48 on the engine's stream; ``tests/test_policies_engine.py``), and
FLOPs are SmolLM2-135M's (the served model). ``clairvoyant`` (``policy_replay.Clairvoyant``) knows
when each node is read next: a reference for how much an online policy leaves on the table. Streams
of other seeds (``--holdout-seeds``), which the policy was not chosen on, are replayed too.
``--engine STREAM ...`` also serves the first ``--engine-requests`` of those streams through the real
engine, one engine per policy of ``--engine-policies`` (TTFT, FLOPs from ``meta_info``, and the
computed tokens next to the replay's).
Writes ``policy_streams.md`` and ``policy_streams.json`` under ``--out``; the hand-written reading of an
existing ``policy_streams.md`` (from its "Reading it" paragraph on) is kept below the new tables.
``--engine-only NAME`` serves the ``--engine`` streams alone (longer ones, say) into ``NAME.md`` / ``NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

from bench_policies import run, write_keeping_notes
from bench_startup import cpu_name  # benchmarks/ is on sys.path when run as a script
from policy_replay import Clairvoyant, replay
from tqdm import tqdm

from sglang_holes.cache.eviction import EvictionPolicy, make_policy
from sglang_holes.cache.recompute_cost import SMOLLM2_135M

# "cost-aware decay=d": one fixed decay (what DecayDuel chooses between); "clairvoyant" knows the stream.
POLICIES = ("lru", "lfu", "slru", "cost-aware decay=2", "cost-aware decay=32", "cost-aware", "clairvoyant")
HOLDOUT = ("lru", "cost-aware decay=2", "cost-aware decay=32", "cost-aware", "clairvoyant")
ENGINE_POLICIES = ("lru", "lfu", "slru", "cost-aware")
ONE = {"max_new_tokens": 1, "temperature": 0.0}


def _zipf(rng: random.Random, n: int, s: float) -> int:
    return rng.choices(range(n), [1 / (k + 1) ** s for k in range(n)])[0]


def _words(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 40000) for _ in range(n)]


def chat(num: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    system = _words(rng, 256)
    sessions = [system + _words(rng, int(2 ** rng.uniform(10, 12.6))) for _ in range(16)]
    out = []
    for _ in range(num):
        s = _zipf(rng, len(sessions), 1.1)
        sessions[s] = sessions[s] + _words(rng, 40)
        out.append(list(sessions[s]))
        sessions[s] = sessions[s] + _words(rng, 60)
    return out


def agent(num: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    system = _words(rng, 256)
    ctx = [list(system) for _ in range(6)]
    out = []
    for _ in range(num):
        a = _zipf(rng, len(ctx), 1.1)
        ctx[a] = ctx[a] + _words(rng, rng.randint(200, 1500))
        out.append(list(ctx[a]))
        ctx[a] = ctx[a] + _words(rng, 60)
        if len(ctx[a]) > 6_000:  # the next prompt stays within SmolLM2's 8k context
            ctx[a] = list(system)
    return out


def rag(num: int, seed: int = 2) -> list[list[int]]:
    rng = random.Random(seed)
    system = _words(rng, 256)
    docs = [_words(rng, rng.randint(300, 1000)) for _ in range(60)]
    out = []
    for _ in range(num):
        picked: list[int] = []
        while len(picked) < 4:
            d = _zipf(rng, len(docs), 1.0)
            if d not in picked:
                picked.append(d)
        out.append(system + [t for d in picked for t in docs[d]] + _words(rng, 40))
    return out


STREAMS: dict[str, Callable[..., list[list[int]]]] = {"chat": chat, "agent": agent, "rag": rag}


def pool_for(requests: list[list[int]], fraction: float) -> int:
    """``fraction`` of the stream's distinct prompt tokens (what a cache holding every prompt would hold:
    a radix tree of them all), at least the longest prompt plus 64 tokens of slack."""
    import torch

    from sglang_holes import HoleTree

    tree, slot = HoleTree(), 0
    for r in requests:
        tree.insert(r, torch.arange(slot, slot + len(r)))
        slot += len(r)
    return max(int(fraction * tree.total_size), max(map(len, requests)) + 64)


def _policy(spec: str, requests: list[list[int]]) -> str | EvictionPolicy:
    if spec == "clairvoyant":
        return Clairvoyant(requests, SMOLLM2_135M)
    if " " in spec:  # "name param=value", e.g. "cost-aware decay=2"
        name, param = spec.split(" ", 1)
        key, value = param.split("=")
        return make_policy(name, SMOLLM2_135M, **{key: float(value)})
    return spec


def replay_grid(requests: list[list[int]], fractions: list[float], chunk: int,
                policies: tuple[str, ...] = POLICIES) -> list[dict]:
    rows = []
    for fraction in fractions:
        pool = pool_for(requests, fraction)
        base = None
        for policy in policies:
            which = _policy(policy, requests)
            out = replay(which, requests, pool, SMOLLM2_135M, chunk)
            flops = sum(o.flops for o in out)
            base = flops if policy == "lru" else base
            rows.append({"fraction": fraction, "pool": pool, "policy": policy, "flops": flops,
                         "computed": sum(o.computed for o in out), "hole_requests": sum(o.holes for o in out),
                         "vs_lru": flops / base})
    return rows


def engine_run(stream: str, policy: str, requests: list[list[int]], pool: int, chunk: int) -> dict:
    """``bench_policies.run`` (the engine and the replay on one stream), in this report's fields."""
    from sglang_holes.model import prepare_embedded_model

    r = run(policy, str(prepare_embedded_model()), requests, pool, chunk)
    return {"stream": stream, "policy": policy, "pool": pool, "engine_flops": r["flops"],
            "computed": r["computed_tokens"], "sim_computed": r["sim_computed_tokens"],
            "agreeing": r["requests_agreeing"], "requests": r["requests"], "flops": r["sim_flops"],
            "ttft_mean_s": r["ttft_mean_s"], "ttft_p90_s": r["ttft_p90_s"], "ttft_s": r["ttft_s"],
            "computed_per_request": r["computed"],
            "replay_per_request": r["replay_per_request"]}


def write(grid: dict[str, list[dict]], holdout: dict[str, dict[int, list[dict]]], engine: list[dict],
          args: argparse.Namespace, machine: str) -> None:
    lines = [f"# Eviction policies on use-like streams ({machine})", "",
             f"`python benchmarks/bench_policy_streams.py --requests {args.requests} --fractions "
             f"{' '.join(map(str, args.fractions))} --chunk {args.chunk}`: prompt FLOPs (SmolLM2-135M, attention + "
             "linear) of every "
             "request, replayed with `policy_replay.replay` (exact against the engine, see policies.md); "
             "pool = fraction of the stream's distinct prompt tokens.", "",
             "| stream | cache | pool | " + " | ".join(f"`{p}` FLOPs vs lru" for p in POLICIES) + " | hole requests "
             "(cost-aware) |", "|---|---|---|" + "---:|" * (len(POLICIES) + 1)]
    for name, rows in grid.items():
        for fraction in args.fractions:
            sel = {r["policy"]: r for r in rows if r["fraction"] == fraction}
            cells = " | ".join(f"{sel[p]['vs_lru']:.3f}" for p in POLICIES)
            lines.append(f"| {name} | {fraction:.0%} | {sel['lru']['pool']} | {cells} | "
                         f"{sel['cost-aware']['hole_requests']}/{args.requests} |")
    seeds = " ".join(map(str, args.holdout_seeds))
    lines += ["", f"The same on other seeds of each stream (`--holdout-seeds {seeds}`; `cost-aware`'s form, its two "
              "decays and the duel's forgetting were chosen on the default seeds and seeds 10-13, not these): FLOPs "
              "vs `lru`, lowest–highest over the seeds.", "",
              "| stream | cache | " + " | ".join(f"`{p}`" for p in HOLDOUT[1:]) + " |",
              "|---|---|" + "---|" * (len(HOLDOUT) - 1)]
    for name, per_seed in holdout.items():
        for fraction in args.fractions:
            cells = []
            for policy in HOLDOUT[1:]:
                v = [r["vs_lru"] for rows in per_seed.values() for r in rows
                     if r["fraction"] == fraction and r["policy"] == policy]
                cells.append(f"{min(v):.3f}–{max(v):.3f}")
            lines.append(f"| {name} | {fraction:.0%} | {' | '.join(cells)} |")
    if engine:
        lines += ["", *engine_lines(engine, args)]
    write_keeping_notes(args.out / "policy_streams.md", lines)
    report = {"grid": grid, "holdout": holdout, "engine": engine}
    (args.out / "policy_streams.json").write_text(json.dumps(report, indent=1))
    print("\n".join(lines))


def engine_lines(engine: list[dict], args: argparse.Namespace) -> list[str]:
    """The engine's table: one row per stream and policy, FLOPs against the same stream's ``lru`` row."""
    lines = [f"Engine, `--engine {' '.join(args.engine)} --engine-requests {args.engine_requests} "
             f"--engine-fraction {args.engine_fraction} --engine-policies {' '.join(args.engine_policies)}` "
             "(the first requests of each stream, served in order by one engine per policy; CPU, one run):", "",
             "| stream | policy | pool | computed tokens: engine / replay | requests agreeing | prompt TFLOP "
             "(engine) | FLOPs vs lru | TTFT mean s | TTFT p90 s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in engine:
        base = next(b for b in engine if b["stream"] == r["stream"] and b["policy"] == "lru")
        lines.append(f"| {r['stream']} | {r['policy']} | {r['pool']} | {r['computed']} / {r['sim_computed']} | "
                     f"{r['agreeing']}/{r['requests']} | {r['engine_flops'] / 1e12:.2f} | "
                     f"{r['engine_flops'] / base['engine_flops']:.3f} | {r['ttft_mean_s']:.3f} | "
                     f"{r['ttft_p90_s']:.3f} |")
    return lines


def write_engine_only(engine: list[dict], args: argparse.Namespace, machine: str) -> None:
    """``--engine-only NAME``: the engine's table alone in ``NAME.md`` / ``NAME.json`` (no replay grid)."""
    cmd = (f"`python benchmarks/bench_policy_streams.py --engine-only {args.engine_only} --chunk {args.chunk} "
           f"--engine {' '.join(args.engine)} --engine-requests {args.engine_requests} --engine-fraction "
           f"{args.engine_fraction} --engine-policies {' '.join(args.engine_policies)}`")
    lines = [f"# Eviction policies in the engine ({machine})", "", cmd, "", *engine_lines(engine, args)]
    write_keeping_notes(args.out / f"{args.engine_only}.md", lines)
    (args.out / f"{args.engine_only}.json").write_text(json.dumps({"engine": engine}, indent=1))
    print("\n".join(lines))


def serve_engine(args: argparse.Namespace) -> list[dict]:
    """The first ``--engine-requests`` of each ``--engine`` stream, served once per policy."""
    engine = []
    for name in args.engine:
        requests = STREAMS[name](args.engine_requests)
        pool = pool_for(requests, args.engine_fraction)
        engine += [engine_run(name, p, requests, pool, args.chunk) for p in args.engine_policies]
    return engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=150)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    ap.add_argument("--holdout-seeds", type=int, nargs="*", default=[20, 21, 22, 23])
    ap.add_argument("--engine", choices=sorted(STREAMS), nargs="*", default=[])
    ap.add_argument("--engine-requests", type=int, default=40)
    ap.add_argument("--engine-fraction", type=float, default=0.25)
    ap.add_argument("--engine-policies", nargs="+", default=list(ENGINE_POLICIES),
                    help="the policies the engine serves each --engine stream with (lru first: the baseline)")
    ap.add_argument("--chunk", type=int, default=4096,
                    help="SGLang's chunked-prefill size (its default on this CPU), for the engine and the replay")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--engine-only", metavar="NAME",
                    help="serve the --engine streams only (no replay grid) and write NAME.md / NAME.json under --out")
    args = ap.parse_args()
    if args.engine and args.engine_policies[0] != "lru":
        ap.error("--engine-policies must start with lru: every engine row is compared with it")
    if args.engine_only and not args.engine:
        ap.error("--engine-only needs --engine STREAM ...")
    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.engine_only:
        write_engine_only(serve_engine(args), args, machine)
        return
    grid = {name: replay_grid(make(args.requests), args.fractions, args.chunk) for name, make in
            tqdm(STREAMS.items(), desc="streams")}
    holdout = {name: {seed: replay_grid(make(args.requests, seed=seed), args.fractions, args.chunk,
                                        HOLDOUT) for seed in args.holdout_seeds}
               for name, make in tqdm(STREAMS.items(), desc="held-out seeds")}
    write(grid, holdout, serve_engine(args), args, machine)


if __name__ == "__main__":
    main()
