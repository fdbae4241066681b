"""Does the chunk store keep its hot documents? Reuse over time on a Zipf RAG stream (issue 20 item 4).

    .venv/bin/python benchmarks/bench_chunk_store.py [--requests 600] [--docs 500] [--capacity 10000] [--out DIR]

A stream of ``--requests`` RAG requests, each reading 5 distinct documents drawn with Zipf
popularity (alpha 1.0, and 0.7 for a flatter mix) from a corpus of ``--docs`` documents of
80-160 tokens (~6x the store's ``--capacity`` tokens). Each request reads its documents (a hit
reuses the stored KV), computes and offers the missing ones to the store; what a request reads
or stored stays locked until it ends, as in the server. Policies at the same capacity:

* ``frequency``: the store's default (``sglang_holes.chunks.store``: a use-count sketch with
  aging, least-used eviction, TinyLFU admission);
* ``lru``: admit everything, evict the least recent (the store before this change);
* ``belady``: the offline ideal: it knows the future and evicts (or does not admit) the
  documents whose next use is farthest.

The first two run the real ``ChunkStore`` (fake slot ids). Reuse rate = reused chunk tokens /
chunk tokens, per window of 50 requests and over the whole stream. Writes chunk_store.md,
chunk_store.json and chunk_store.png.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from bench_startup import cpu_name  # benchmarks/ is on sys.path when run as a script
from tqdm import tqdm

from sglang_holes.chunks.store import ChunkStore

WINDOW = 50
PER_REQUEST = 5


def make_stream(requests: int, docs: int, alpha: float, seed: int) -> tuple[list[int], list[list[int]]]:
    """(document lengths, per request the documents it reads)."""
    rng = random.Random(seed)
    lengths = [rng.randint(80, 160) for _ in range(docs)]
    weights = [1.0 / (r + 1) ** alpha for r in range(docs)]
    order = list(range(docs))
    rng.shuffle(order)  # popularity rank is unrelated to document id
    stream = []
    for _ in range(requests):
        picked: list[int] = []
        while len(picked) < PER_REQUEST:
            d = order[rng.choices(range(docs), weights)[0]]
            if d not in picked:
                picked.append(d)
        stream.append(picked)
    return lengths, stream


def run_store(policy: str, capacity: int, lengths: list[int], stream: list[list[int]]) -> list[tuple[int, int]]:
    """Per request (reused tokens, chunk tokens) through a real ``ChunkStore``."""
    store = ChunkStore(capacity=capacity, policy=policy)
    next_slot, free = 1, []
    out = []
    for picked in stream:
        held, reused, total = [], 0, 0
        for d in picked:
            tokens = [d] * lengths[d]  # identity = document id (length fixed per document)
            total += lengths[d]
            store.record_use(tokens)
            entry = store.lookup(tokens)
            if entry is not None:
                reused += lengths[d]
                store.lock(entry)
                held.append(entry)
                continue
            decision = store.admission(tokens)
            if not decision.admit:
                continue
            free += store.drop(decision.victims).tolist()
            while len(free) < lengths[d]:  # fake slot ids: a fresh one whenever none was given back
                free.append(next_slot)
                next_slot += 1
            slots = [free.pop() for _ in range(lengths[d])]
            entry, _ = store.insert(tokens, torch.tensor(slots), 0)
            store.lock(entry)
            held.append(entry)
        for entry in held:
            store.unlock(entry)
        store.check_integrity()
        out.append((reused, total))
    return out


def run_belady(capacity: int, lengths: list[int], stream: list[list[int]]) -> list[tuple[int, int]]:
    """The offline ideal: on a miss, store the document unless everything it would displace is used
    again sooner; displace the documents used farthest in the future (never the current request's)."""
    uses: dict[int, list[int]] = {}
    for t, picked in enumerate(stream):
        for d in picked:
            uses.setdefault(d, []).append(t)
    cursor = dict.fromkeys(uses, 0)

    def next_use(d: int, t: int) -> float:
        times, i = uses[d], cursor[d]
        while i < len(times) and times[i] <= t:
            i += 1
        cursor[d] = i
        return times[i] if i < len(times) else float("inf")

    stored: set[int] = set()
    size, out = 0, []
    for t, picked in enumerate(stream):
        reused = sum(lengths[d] for d in picked if d in stored)
        for d in picked:
            if d in stored:
                continue
            need, mine = lengths[d], next_use(d, t)
            if mine == float("inf"):
                continue
            victims, room = [], capacity - size
            for v in sorted((v for v in stored if v not in picked), key=lambda v: -next_use(v, t)):
                if room >= need:
                    break
                if next_use(v, t) <= mine:
                    break
                victims.append(v)
                room += lengths[v]
            if room < need:
                continue
            for v in victims:
                stored.discard(v)
                size -= lengths[v]
            stored.add(d)
            size += need
        out.append((reused, sum(lengths[d] for d in picked)))
    return out


def windows(per_request: list[tuple[int, int]]) -> list[float]:
    out = []
    for a in range(0, len(per_request), WINDOW):
        part = per_request[a : a + WINDOW]
        out.append(sum(r for r, _ in part) / max(1, sum(n for _, n in part)))
    return out


def rate(per_request: list[tuple[int, int]], skip: int = 0) -> float:
    part = per_request[skip:]
    return sum(r for r, _ in part) / max(1, sum(n for _, n in part))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--docs", type=int, default=500)
    ap.add_argument("--capacity", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    results = {}
    for alpha in tqdm((1.0, 0.7), desc="Zipf settings"):
        lengths, stream = make_stream(args.requests, args.docs, alpha, args.seed)
        runs = {"frequency": run_store("frequency", args.capacity, lengths, stream),
                "lru": run_store("lru", args.capacity, lengths, stream),
                "belady": run_belady(args.capacity, lengths, stream)}
        results[alpha] = {"corpus_tokens": sum(lengths), **{
            name: {"overall": rate(r), "after_warmup": rate(r, 2 * WINDOW), "windows": windows(r)}
            for name, r in runs.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chunk_store.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "results": results}, indent=2) + "\n")
    cmd = (f"python benchmarks/bench_chunk_store.py --requests {args.requests} --docs {args.docs} "
           f"--capacity {args.capacity}")
    lines = ["# Chunk store: reuse over time on a Zipf stream", "",
             f"`{cmd}` (a simulation of the store's own code, no model; {cpu_name()}). {args.requests} requests "
             f"of {PER_REQUEST} documents; store capacity {args.capacity} tokens.", "",
             "| Zipf alpha | corpus tokens | policy | reuse rate, whole stream | after the first 100 requests | "
             "behind the ideal (points, after 100) |",
             "|---|---|---|---|---|---|"]
    for alpha, res in results.items():
        ideal = res["belady"]["after_warmup"]
        for name in ("frequency", "lru", "belady"):
            gap = 100 * (ideal - res[name]["after_warmup"])
            lines.append(f"| {alpha} | {res['corpus_tokens']} | {name} | {res[name]['overall']:.1%} | "
                         f"{res[name]['after_warmup']:.1%} | {gap:.1f} |")
    lines += ["", "Reuse rate = reused chunk tokens / chunk tokens; `belady` is the offline ideal (it knows the "
              "future). Plot: chunk_store.png (per window of 50 requests).", ""]
    (args.out / "chunk_store.md").write_text("\n".join(lines))
    _plot(results, args.out / "chunk_store.png")
    print("\n".join(lines))


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), sharey=True)
    for ax, (alpha, res) in zip(axes, results.items(), strict=True):
        for name, style in (("frequency", "-"), ("lru", "--"), ("belady", ":")):
            w = res[name]["windows"]
            ax.plot([WINDOW * (i + 1) for i in range(len(w))], [100 * x for x in w], style, label=name)
        ax.set_title(f"Zipf alpha {alpha}")
        ax.set_xlabel("requests")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"reuse rate per {WINDOW} requests (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
