"""Eviction cost per freed token as the cached tree grows, for every policy of the ``holes`` cache.

    .venv/bin/python benchmarks/bench_eviction_time.py [--sizes 10000 100000 1000000] [--evict 16]

Builds a ``HoleTree`` holding ``size`` tokens (4k-token multi-turn contexts under a shared 2k
prefix, each context branching into turns, so the tree has many nodes and leaves), then times
``evict(n)`` calls of ``--evict`` tokens (what SGLang asks for when a decode step or a small prefill
runs short) until ``--target`` tokens are freed, median over fresh copies of the same tree, and
reports microseconds per freed token. Flat across sizes means the victim search is incremental; growing means each
call scans the tree (issue 22 item 4). Writes ``benchmarks/results/eviction_time.md``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sglang_holes import HoleTree, make_policy

POLICIES = ("lru", "lfu", "slru", "priority", "lru-leaf", "cost-aware", "priority-cost")
OUT = Path(__file__).resolve().parent / "results" / "eviction_time.md"


def build(total: int, policy: str, seed: int = 0) -> HoleTree:
    """Contexts of 4k tokens under a 2k shared prefix, each with 4 turns of 256 tokens branching off it."""
    rng = random.Random(seed)
    tree = HoleTree(page_size=1, policy=make_policy(policy))
    prefix = [rng.randrange(1, 10**6) for _ in range(2048)]
    slot = 1
    while tree.total_size < total:
        ctx = prefix + [rng.randrange(1, 10**6) for _ in range(4096)]
        for _ in range(4):
            turn = ctx + [rng.randrange(1, 10**6) for _ in range(256)]
            tree.insert(turn, torch.arange(slot, slot + len(turn)))
            slot += len(turn)
            tree.match(turn[: rng.randrange(2048, len(turn))])
    return tree


def time_evictions(tree: HoleTree, n: int, target: int, reps: int) -> float:
    """Median over ``reps`` fresh copies of microseconds per freed token, evicting ``n`` tokens per call
    until ``target`` tokens are freed (the same amount at every tree size)."""
    per_token = []
    for _ in range(reps):
        t = copy.deepcopy(tree)
        freed = 0
        t0 = time.perf_counter()
        while freed < target:
            freed += int(t.evict(n).numel())
        per_token.append((time.perf_counter() - t0) * 1e6 / freed)
    return statistics.median(per_token)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--evict", type=int, default=16, help="tokens per evict call")
    ap.add_argument("--target", type=int, default=4000, help="tokens freed per measurement")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    args = ap.parse_args()
    rows = []
    for policy in tqdm(args.policies, desc="policies"):
        row = {"policy": policy}
        for size in args.sizes:
            tree = build(size, policy)
            row[size] = time_evictions(tree, args.evict, args.target, args.reps)
            row[f"nodes{size}"] = len(tree.nodes())
        rows.append(row)
    lines = [f"# Eviction time per freed token vs cached tokens ({platform.processor() or platform.machine()})", "",
             f"`python benchmarks/bench_eviction_time.py --sizes {' '.join(map(str, args.sizes))} "
             f"--evict {args.evict}`: `evict({args.evict})` until {args.target:,} tokens are freed, median of "
             f"{args.reps} copies; µs per freed token (lower is better; flat across sizes = incremental).", "",
             "| policy | " + " | ".join(f"{s:,} tokens" for s in args.sizes) + " | growth |",
             "|---|" + "---:|" * (len(args.sizes) + 1)]
    for r in rows:
        cells = " | ".join(f"{r[s]:.1f}" for s in args.sizes)
        lines.append(f"| `{r['policy']}` | {cells} | {r[args.sizes[-1]] / r[args.sizes[0]]:.1f}× |")
    lines += ["", "Tree nodes: " + ", ".join(f"{s:,} tokens → {rows[0][f'nodes{s}']:,}" for s in args.sizes) + "."]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
