"""Trace-driven eviction simulator: lru-leaf (stock SGLang) vs cost-aware hole punching.

    .venv/bin/python benchmarks/simulate_eviction.py [--requests 300] [--out benchmarks/results]

No model runs: each request matches its prompt in a ``HoleTree``, "recomputes" exactly
its missing spans (holes and the uncached tail), allocates slots for them (evicting by
the policy under test when the pool is full, with its own reused KV locked), inserts
prompt + answer back, and unlocks. Recompute cost is counted in FLOPs with the
``RecomputeCost`` of a real model (Llama-3-8B, SmolLM2-135M; cost-aware uses the
constants of the model it serves). Traces (fixed seeds):

* ``chat-long``: shared 2k-token system prompt; 24 sessions, each with a document of
  8k-128k tokens (log-uniform) and multi-turn follow-ups (50-token question,
  200-token answer); Zipf(1.1) session popularity.
* ``agent``: 6 agents whose context keeps growing (tool outputs of 0.5k-4k tokens per
  step) after a shared 2k prompt; Zipf(1.1) over agents.
* ``rag``: shared 1k-token system prompt, 4 documents (0.5k-2k tokens) drawn from a
  pool of 150 with Zipf(1.0) popularity in random order, then a 40-token question.

Cache sizes are fractions of each trace's distinct tokens. Prints a table, writes
``eviction.md`` and ``eviction.png``, with a progress bar while it runs.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from sglang_holes import HoleTree, make_policy
from sglang_holes.cache.decay_duel import make_duel
from sglang_holes.cache.recompute_cost import LLAMA3_8B, SMOLLM2_135M, RecomputeCost

MODELS = {"Llama-3-8B": LLAMA3_8B, "SmolLM2-135M": SMOLLM2_135M}


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    answer: tuple[int, ...]


def _zipf_choice(rng: random.Random, n: int, s: float) -> int:
    weights = [1 / (k + 1) ** s for k in range(n)]
    return rng.choices(range(n), weights)[0]


class Tokens:
    """Fresh token ids, never repeated (so reuse happens only where a trace intends it)."""

    def __init__(self) -> None:
        self.next = 1

    def take(self, n: int) -> tuple[int, ...]:
        out = tuple(range(self.next, self.next + n))
        self.next += n
        return out


def chat_long(num: int, seed: int = 0) -> Iterator[Request]:
    rng, tok = random.Random(seed), Tokens()
    system = tok.take(2048)
    sessions = [list(system + tok.take(int(2 ** rng.uniform(13, 17)))) for _ in range(24)]
    for _ in range(num):
        s = _zipf_choice(rng, len(sessions), 1.1)
        prompt = tuple(sessions[s]) + tok.take(50)
        answer = tok.take(200)
        sessions[s] = list(prompt + answer)
        yield Request(prompt, answer)


def agent(num: int, seed: int = 1) -> Iterator[Request]:
    rng, tok = random.Random(seed), Tokens()
    system = tok.take(2048)
    ctx = [list(system) for _ in range(6)]
    for _ in range(num):
        a = _zipf_choice(rng, len(ctx), 1.1)
        prompt = tuple(ctx[a]) + tok.take(rng.randint(512, 4096))
        answer = tok.take(100)
        ctx[a] = list(prompt + answer)
        if len(ctx[a]) > 120_000:  # the agent starts a fresh task
            ctx[a] = list(system)
        yield Request(prompt, answer)


def rag(num: int, seed: int = 2) -> Iterator[Request]:
    rng, tok = random.Random(seed), Tokens()
    system = tok.take(1024)
    pool = [tok.take(rng.randint(512, 2048)) for _ in range(150)]
    for _ in range(num):
        docs: list[int] = []
        while len(docs) < 4:
            d = _zipf_choice(rng, len(pool), 1.0)
            if d not in docs:
                docs.append(d)
        prompt = system + tuple(t for d in docs for t in pool[d]) + tok.take(40)
        yield Request(prompt, tok.take(100))


TRACES = {"chat-long": chat_long, "agent": agent, "rag": rag}


@dataclass
class Stats:
    prompt_tokens: int = 0
    reused: int = 0
    recomputed: int = 0
    flops: dict[str, float] = field(default_factory=dict)


def simulate(requests: list[Request], capacity: int, policy: str, cost: RecomputeCost, bar: tqdm) -> Stats:
    tree = HoleTree(policy=make_policy(policy, cost))
    duel = make_duel(tree.policy, capacity)  # cost-aware's shadows, as the server keeps them
    free = torch.arange(capacity)
    st = Stats(flops=dict.fromkeys(MODELS, 0.0))
    for req in requests:
        toks = req.prompt + req.answer
        r = tree.match(req.prompt)
        st.prompt_tokens += len(req.prompt)
        st.reused += r.reused_tokens
        for s, e in r.missing:
            st.recomputed += e - s
            for name, model in MODELS.items():
                st.flops[name] += model.span(s, e)
        tree.lock(r.handle)
        need = len(toks) - r.reused_tokens
        if need > free.numel():
            short = min(need - free.numel(), tree.evictable_size)
            if short > 0:
                free = torch.cat([free, tree.evict(short)])
        if need <= free.numel():
            row = torch.empty(len(toks), dtype=torch.int64)
            new, free = free[:need], free[need:]
            mask = torch.ones(len(toks), dtype=torch.bool)
            for s, e, slots in r.segments:
                if slots is not None:
                    row[s:e] = slots
                    mask[s:e] = False
            row[mask] = new
            free = torch.cat([free, tree.insert(toks, row).rejected_slots])
        tree.unlock(r.handle)
        if duel is not None:
            duel.observe(req.prompt, [tree])
        bar.update()
    tree.check_integrity()
    return st


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    traces = {name: list(fn(args.requests)) for name, fn in TRACES.items()}
    runs = [(t, f) for t in traces for f in args.fractions]
    seen: set[tuple[str, int]] = set()
    rows = []
    with tqdm(total=len(runs) * 3 * args.requests, desc="simulating", unit="req") as bar:
        for trace, frac in runs:
            reqs = traces[trace]
            distinct = len({t for r in reqs for t in r.prompt + r.answer})
            longest = max(len(r.prompt) + len(r.answer) for r in reqs)
            capacity = max(int(frac * distinct), int(1.2 * longest))  # every request must fit
            if (trace, capacity) in seen:  # a small fraction clamped to the same size
                bar.update(3 * args.requests)
                continue
            seen.add((trace, capacity))
            base = simulate(reqs, capacity, "lru-leaf", LLAMA3_8B, bar)
            for name, model in MODELS.items():
                ca = simulate(reqs, capacity, "cost-aware", model, bar)
                rows.append({
                    "trace": trace, "capacity": capacity, "frac": capacity / distinct, "model": name,
                    "lru_flops": base.flops[name], "ca_flops": ca.flops[name],
                    "lru_hit": base.reused / base.prompt_tokens, "ca_hit": ca.reused / ca.prompt_tokens,
                    "lru_tok": base.recomputed, "ca_tok": ca.recomputed,
                })
    lines = ["| trace | cache (tokens, % of distinct) | model | lru-leaf PFLOP | cost-aware PFLOP | "
             "FLOPs saved | hit ratio lru / cost | tokens recomputed lru / cost |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        saved = 1 - r["ca_flops"] / r["lru_flops"] if r["lru_flops"] else 0.0
        lines.append(f"| {r['trace']} | {r['capacity']:,} ({r['frac']:.0%}) | {r['model']} | "
                     f"{r['lru_flops'] / 1e15:.2f} | {r['ca_flops'] / 1e15:.2f} | {saved:+.1%} | "
                     f"{r['lru_hit']:.2f} / {r['ca_hit']:.2f} | {r['lru_tok']:,} / {r['ca_tok']:,} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eviction.md").write_text(
        f"Command: `.venv/bin/python benchmarks/simulate_eviction.py --requests {args.requests}`\n\n{table}\n")
    plot(rows, args.out / "eviction.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    keys = sorted({(r["trace"], r["capacity"]) for r in rows}, key=lambda k: (list(TRACES).index(k[0]), k[1]))
    width = 0.8 / len(MODELS)
    for j, model in enumerate(MODELS):
        by = {(r["trace"], r["capacity"]): r for r in rows if r["model"] == model}
        saved = [100 * (1 - by[k]["ca_flops"] / by[k]["lru_flops"]) for k in keys]
        ax.bar([i + (j - (len(MODELS) - 1) / 2) * width for i in range(len(keys))], saved, width, label=model)
    ax.axhline(30, color="gray", ls="--", lw=1, label="target (long-context traces)")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(keys)), [f"{t}\n{by[(t, c)]['frac']:.0%} cache" for t, c in keys], fontsize=8)
    ax.set_ylabel("recompute FLOPs saved vs lru-leaf (%)")
    ax.set_title("cost-aware eviction (holes) vs stock lru-leaf, equal memory")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
