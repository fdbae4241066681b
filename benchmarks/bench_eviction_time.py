"""Eviction cost per freed token as the cached tree grows, for every policy of the ``holes`` cache.

    .venv/bin/python benchmarks/bench_eviction_time.py [--sizes 10000 100000 1000000] [--evict 16]

Builds a ``HoleTree`` holding ``size`` tokens (4k-token multi-turn contexts under a shared 2k
prefix, each context branching into turns, so the tree has many nodes and leaves), then times
``evict(n)`` calls of ``--evict`` tokens (what SGLang asks for when a decode step or a small prefill
runs short) until ``--target`` tokens are freed, median over fresh copies of the same tree, and
reports microseconds per freed token, for the policy's own incremental search (``victim_index.HeapIndex``) and for
the full scan it is tested against (``ScanIndex``, ``HoleTree(reference_search=True)``). Flat across sizes means the
search is incremental; growing means each call scans the tree (issue 22 item 4). The heap's price is paid on the
tree's updates instead, so the time of a ``match`` (which updates every node on its path) is reported for both.
Writes ``benchmarks/results/eviction_time.md``.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from pathlib import Path

import torch
from bench_startup import cpu_name  # benchmarks/ is on sys.path when run as a script
from tqdm import tqdm

from sglang_holes import HoleTree, make_policy
from sglang_holes.cache.decay_duel import DecayDuel

POLICIES = ("lru", "lfu", "slru", "priority", "lru-leaf", "cost-aware", "priority-cost")
OUT = Path(__file__).resolve().parent / "results" / "eviction_time.md"


def build(total: int, policy: str, scan: bool, seed: int = 0) -> tuple[HoleTree, list[list[int]]]:
    """Contexts of 4k tokens under a 2k shared prefix, each with 4 turns of 256 tokens branching off it;
    and the turns."""
    rng = random.Random(seed)
    tree = HoleTree(page_size=1, policy=make_policy(policy), reference_search=scan)
    turns = []
    prefix = [rng.randrange(1, 10**6) for _ in range(2048)]
    slot = 1
    while tree.total_size < total:
        ctx = prefix + [rng.randrange(1, 10**6) for _ in range(4096)]
        for _ in range(4):
            turn = ctx + [rng.randrange(1, 10**6) for _ in range(256)]
            tree.insert(turn, torch.arange(slot, slot + len(turn)))
            slot += len(turn)
            tree.match(turn[: rng.randrange(2048, len(turn))])
            turns.append(turn)
    return tree, turns


def time_matches(tree: HoleTree, turns: list[list[int]], reps: int = 200) -> float:
    """Median microseconds of one ``match`` of a cached turn (on a copy: matches change the statistics)."""
    t, rng, times = copy.deepcopy(tree), random.Random(1), []
    for _ in range(reps):
        turn = rng.choice(turns)
        t0 = time.perf_counter()
        t.match(turn)
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


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


def time_duel(tree: HoleTree, turns: list[list[int]], capacity: int) -> dict[str, float]:
    """``cost-aware``'s decay duel at this size: ms to rebuild the heap when the lead switches
    (``HoleTree.reindex``, on a copy of ``tree``), and ``DecayDuel.observe`` of every turn in order with
    shadows of ``capacity`` tokens: median µs per finished request and per prompt token."""
    t = copy.deepcopy(tree)
    t0 = time.perf_counter()
    t.policy.follow(1 - t.policy.lead)
    t.reindex()
    rebuild_ms = (time.perf_counter() - t0) * 1e3
    duel = DecayDuel(make_policy("cost-aware"), capacity)
    per_request, per_token = [], []
    for turn in turns:
        t0 = time.perf_counter()
        duel.observe(turn)
        dt = (time.perf_counter() - t0) * 1e6
        per_request.append(dt)
        per_token.append(dt / len(turn))
    return {"rebuild_ms": rebuild_ms, "observe_us": statistics.median(per_request),
            "observe_ns_per_token": 1e3 * statistics.median(per_token)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--evict", type=int, default=16, help="tokens per evict call")
    ap.add_argument("--target", type=int, default=4000, help="tokens freed per measurement")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    args = ap.parse_args()
    rows, duel = [], {}
    for policy in tqdm(args.policies, desc="policies"):
        for scan in (False, True):
            row = {"policy": policy, "search": "scan" if scan else "heap"}
            for size in args.sizes:
                tree, turns = build(size, policy, scan)
                row[size] = time_evictions(tree, args.evict, args.target, args.reps)
                row[f"match{size}"] = time_matches(tree, turns)
                row[f"nodes{size}"] = len(tree.nodes())
                if policy == "cost-aware" and not scan:
                    duel[size] = time_duel(tree, turns, size)
            rows.append(row)
    first, last = args.sizes[0], args.sizes[-1]
    lines = [f"# Eviction time per freed token vs cached tokens ({cpu_name()})", "",
             f"`python benchmarks/bench_eviction_time.py --sizes {' '.join(map(str, args.sizes))} "
             f"--evict {args.evict}`: `evict({args.evict})` until {args.target:,} tokens are freed, median of "
             f"{args.reps} copies; µs per freed token (lower is better; flat across sizes = incremental). `heap`: "
             "the policy's incremental search (what the cache runs); `scan`: the full-tree reference. Last "
             "columns: median µs of one `match` of a cached turn (the heap is updated on every matched node).", "",
             "| policy | search | " + " | ".join(f"{s:,} tokens" for s in args.sizes) + " | growth | "
             f"match µs at {first:,} | match µs at {last:,} |",
             "|---|---|" + "---:|" * (len(args.sizes) + 3)]
    for r in rows:
        cells = " | ".join(f"{r[s]:.2f}" for s in args.sizes)
        lines.append(f"| `{r['policy']}` | {r['search']} | {cells} | {r[last] / r[first]:.1f}× | "
                     f"{r[f'match{first}']:.0f} | {r[f'match{last}']:.0f} |")
    lines += ["", "Tree nodes: " + ", ".join(f"{s:,} tokens → {rows[0][f'nodes{s}']:,}" for s in args.sizes) + "."]
    if duel:
        lines += ["", "`cost-aware`'s decay duel (`DecayDuel`, shadows of the cached size fed every turn in order; "
                  "a lead switch rebuilds the real tree's heap):", "",
                  "| cached tokens | heap rebuild at a switch, ms | `observe` per finished request, µs (median) | "
                  "per prompt token, ns |", "|---:|---:|---:|---:|"]
        lines += [f"| {size:,} | {d['rebuild_ms']:.2f} | {d['observe_us']:.0f} | {d['observe_ns_per_token']:.0f} |"
                  for size, d in duel.items()]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
