"""HoleTree match/insert cost on a tree holding ~1M tokens.

    .venv/bin/python benchmarks/bench_tree.py [--tokens 1000000] [--page-size 1 16]

Builds a tree of 250 documents of 4k tokens under a shared 2k prefix (~1M tokens),
punches 3 holes into every document, then times (median of 200 calls, fixed seed):
``match`` of a cached 4k-token prompt (walks through its holes), ``match`` of a
prompt sharing only the prefix, ``insert`` filling a prompt's holes, and ``insert``
of a new 4k-token branch. Cost should grow with tokens / page_size + nodes touched,
not with the tree's size: the 10k-token rows check that.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from sglang_holes import HoleTree, make_policy


def _median_us(fn, reps: int = 200) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def build(total: int, page: int, doc_len: int = 4096, prefix: int = 2048):
    rng = random.Random(0)
    tree = HoleTree(page_size=page, policy=make_policy("cost-aware"))
    base = tuple(range(1, prefix + 1))
    docs, slot = [], 0
    while tree.total_size < total:
        d = base + tuple(rng.randrange(10**6, 10**9) for _ in range(doc_len))
        tree.insert(d, torch.arange(slot, slot + len(d)))
        slot += len(d)
        docs.append(d)
    for d in docs:
        for a in (prefix + 512, prefix + 2048, prefix + 3584):
            tree.evict_span(d, a, a + 4 * page)
    return tree, docs, slot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--page-size", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()
    print("| page size | tree tokens | nodes | operation | prompt tokens | median µs |")
    print("|---|---|---|---|---|---|")
    for page in args.page_size:
        tree, docs, next_slot = build(args.tokens, page)
        nodes = len(tree.nodes())
        rng = random.Random(1)
        d = docs[len(docs) // 2]
        long = d + tuple(rng.randrange(10**6, 10**9) for _ in range(6000))
        fresh = docs[0][:2048] + tuple(rng.randrange(10**6, 10**9) for _ in range(4096))
        rows = [
            ("match, cached prompt with 3 holes", d),
            ("match, 10k prompt (4k cached + new)", long),
            ("match, shares only the prefix", fresh),
        ]
        for name, prompt in rows:
            us = _median_us(lambda p=prompt, t=tree: t.match(p))
            print(f"| {page} | {tree.total_size:,} | {nodes:,} | {name} | {len(prompt):,} | {us:.0f} |")
        # insert filling the 3 holes of a document (re-punched between calls; timed alone)
        holes = [(a, a + 4 * page) for a in (2048 + 512, 2048 + 2048, 2048 + 3584)]
        row = torch.arange(next_slot, next_slot + len(d))
        times = []
        for _ in range(200):
            r = tree.match(d)
            full = row.clone()
            for s, e, sl in r.segments:
                if sl is not None:
                    full[s:e] = sl
            t0 = time.perf_counter()
            tree.insert(d, full)
            times.append(time.perf_counter() - t0)
            for a, b in holes:
                tree.evict_span(d, a, b)
        print(f"| {page} | {tree.total_size:,} | {nodes:,} | insert filling 3 holes | {len(d):,} | "
              f"{statistics.median(times) * 1e6:.0f} |")
        times = []
        for k in range(50):
            branch = d[:4096] + tuple(rng.randrange(10**6, 10**9) for _ in range(4096))
            t0 = time.perf_counter()
            tree.insert(branch, torch.arange(10**8 + k * 9000, 10**8 + k * 9000 + len(branch)))
            times.append(time.perf_counter() - t0)
        print(f"| {page} | {tree.total_size:,} | {nodes:,} | insert new 4k branch | {len(branch):,} | "
              f"{statistics.median(times) * 1e6:.0f} |")


if __name__ == "__main__":
    main()
