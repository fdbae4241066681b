"""How many requests ``cost-aware``'s decay duel needs before it pays: FLOPs vs ``lru`` by stream length.

    .venv/bin/python benchmarks/bench_duel_warmup.py [--lengths 40 80 150] [--seeds -1 10 11 12 13 20 21 22 23]

The duel (``sglang_holes/cache/decay_duel.py``) starts on recency and learns from the requests it
sees which decay to follow, so its first requests are paid at whatever the wrong decay costs, and
on a short stream a switch on thin evidence can move the cache to a decay that its own contents
(shaped by the previous decay) do not reward yet. This replays the first ``--lengths`` requests of
each stream of ``bench_policy_streams`` (seed -1: the stream's default seed) at 10%, 25% and 50% of
their distinct tokens with ``policy_replay.replay`` (exact against the engine), for ``lru``, the
duel (by default: it moves on a lead that survives leaving out its best request; and with
``switch_confidence=2``: only on a lead of two standard errors) and the two fixed decays it mostly
chooses between, and writes ``duel_warmup.md`` (FLOPs vs
``lru``: lowest, median and highest over the seeds, and the cells above ``lru``) and
``duel_warmup.png`` (cumulative FLOPs vs ``lru`` request by request on the default seeds), keeping
the hand-written reading of an existing ``duel_warmup.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
from itertools import accumulate
from pathlib import Path

# benchmarks/ is on sys.path when run as a script
from bench_policies import write_keeping_notes
from bench_policy_streams import STREAMS, _policy, pool_for
from bench_startup import cpu_name
from policy_replay import replay
from tqdm import tqdm

from sglang_holes.cache.recompute_cost import SMOLLM2_135M

POLICIES = ("cost-aware", "cost-aware switch_confidence=2", "cost-aware decay=2", "cost-aware decay=32")
DUELS = POLICIES[:2]  # the default duel, and the one that switches only on a confident lead
FRACTIONS = (0.1, 0.25, 0.5)


def per_request(policy: str, requests: list[list[int]], fraction: float) -> list[float]:
    """Prompt FLOPs of each request under ``policy`` with a pool of ``fraction`` of the stream's tokens."""
    pool = pool_for(requests, fraction)
    return [o.flops for o in replay(_policy(policy, requests), requests, pool, SMOLLM2_135M, 4096)]


def sweep(lengths: list[int], seeds: list[int]) -> list[dict]:
    """One row per stream × length × cache × seed: each policy's total FLOPs over ``lru``'s."""
    rows = []
    cells = [(n, s, length) for n in STREAMS for length in lengths for s in seeds]
    for name, seed, length in tqdm(cells, desc="stream × length × seed"):
        requests = STREAMS[name](length) if seed < 0 else STREAMS[name](length, seed=seed)
        for fraction in FRACTIONS:
            base = sum(per_request("lru", requests, fraction))
            rows.append({"stream": name, "requests": length, "seed": seed, "fraction": fraction,
                         **{p: sum(per_request(p, requests, fraction)) / base for p in POLICIES}})
    return rows


def table(rows: list[dict], lengths: list[int]) -> list[str]:
    lines = ["| stream | requests | cache | " + " | ".join(f"`{p}` vs lru: low / median / high" for p in POLICIES)
             + "".join(f" | cells above lru (`{p}`)" for p in DUELS) + " |",
             "|---|---|---|" + "---|" * (len(POLICIES) + len(DUELS))]
    for name in STREAMS:
        for length in lengths:
            for fraction in FRACTIONS:
                sel = [r for r in rows if (r["stream"], r["requests"], r["fraction"]) == (name, length, fraction)]
                stats = []
                for p in POLICIES:
                    v = [r[p] for r in sel]
                    stats.append(f"{min(v):.3f} / {statistics.median(v):.3f} / {max(v):.3f}")
                above = [f"{sum(r[p] > 1 for r in sel)}/{len(sel)}" for p in DUELS]
                lines.append(f"| {name} | {length} | {fraction:.0%} | {' | '.join(stats + above)} |")
    return lines


def plot(length: int, fraction: float, path: Path) -> None:
    """Cumulative FLOPs vs ``lru`` after each request of each stream's default seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(STREAMS), figsize=(5 * len(STREAMS), 3.6), sharey=True)
    for ax, name in zip(axes, STREAMS, strict=True):
        requests = STREAMS[name](length)
        base = list(accumulate(per_request("lru", requests, fraction)))
        for p in POLICIES:
            ratio = [c / b for c, b in zip(accumulate(per_request(p, requests, fraction)), base, strict=True)]
            ax.plot(range(1, length + 1), ratio, label=p, lw=2 if p == "cost-aware" else 1)
        ax.axhline(1.0, color="grey", ls=":", lw=1)
        ax.set(title=f"{name}, {fraction:.0%} cache", xlabel="requests served")
    axes[0].set_ylabel("prompt FLOPs so far / lru's")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[40, 80, 150])
    ap.add_argument("--seeds", type=int, nargs="+", default=[-1, 10, 11, 12, 13, 20, 21, 22, 23])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    rows = sweep(args.lengths, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(max(args.lengths), 0.25, args.out / "duel_warmup.png")
    seeds = " ".join(map(str, args.seeds))
    lines = [f"# The decay duel's warm-up ({cpu_name()}, {os.cpu_count()} cores)", "",
             f"`python benchmarks/bench_duel_warmup.py --lengths {' '.join(map(str, args.lengths))} --seeds {seeds}`: "
             "prompt FLOPs (SmolLM2-135M) of the first N requests of each stream of `bench_policy_streams.py`, "
             "replayed with `policy_replay.replay` (exact against the engine) at a pool of 10/25/50% of those "
             "requests' distinct tokens; over the seeds (-1: the stream's default seed).", "",
             *table(rows, args.lengths), "", "![cumulative FLOPs vs lru, default seeds, 25% cache](duel_warmup.png)"]
    write_keeping_notes(args.out / "duel_warmup.md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
