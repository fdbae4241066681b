"""Segmented-prefill kernel benchmark: one launch for all holes vs the alternatives.

    .venv/bin/python benchmarks/bench_attention.py [--out results/] [--quick]

On a CUDA GPU (FlashInfer installed), for n in {4k, 16k, 64k} tokens, k in
{1, 4, 16, 64, 256} holes of length {1, 16, 128, 1024} spread evenly (where
k * len <= n / 2), one attention layer of a Llama-3-8B shape (Hq=32, Hkv=8,
D=128, bf16), it times (median of CUDA-event timings after warm-up):

* ``per_span``     one FlashInfer plan + launch per hole (the baseline)
* ``custom_mask``  one launch, compacted queries, mask by original position
* ``spans``        one launch, one causal request per hole, no mask
* ``auto``         whichever the cost model picks
* ``stock``        SGLang's stock behaviour: recompute everything from the first hole
* ``floor``        one dense causal prefill doing the same attention FLOPs as the holes

Run time only (``run()`` per layer); ``plan()`` happens once per batch and is timed
separately as ``plan_ms`` for custom_mask. Prints a markdown table and writes
``attention.md``, ``attention.csv`` and ``attention.png`` under ``--out``.

Without CUDA it runs the pure-torch reference on small sizes, checks it, and says
that kernel numbers need a GPU.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from pathlib import Path

import torch

from sglang_holes import AttentionParams, FlashInferHoleAttention, HolePlan, choose_path, segmented_attention
from sglang_holes.attention import KVCache

HQ, HKV, D = 32, 8, 128


def even_holes(n: int, k: int, length: int) -> list[tuple[int, int]]:
    stride = n // k
    return [(j * stride + (stride - length) // 2, j * stride + (stride - length) // 2 + length) for j in range(k)]


def cuda_median_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def bench_gpu(n: int, k: int, length: int, cache: dict) -> dict:
    import flashinfer

    dev = torch.device("cuda")
    holes = even_holes(n, k, length)
    plan = HolePlan.from_holes([n], [holes])
    slots = [torch.arange(n)]
    if n not in cache:
        g = torch.Generator(device=dev).manual_seed(0)
        cache[n] = (torch.randn(n, HKV, D, device=dev, dtype=torch.bfloat16, generator=g),
                    torch.randn(n, HKV, D, device=dev, dtype=torch.bfloat16, generator=g),
                    torch.randn(n, HQ, D, device=dev, dtype=torch.bfloat16, generator=g))
    kc, vc, qfull = cache[n]
    q = qfull[plan.q_positions.to(dev)]
    params = AttentionParams(HQ, HKV, D, torch.bfloat16, torch.bfloat16)
    row: dict = {"n": n, "k": k, "len": length, "m": plan.num_queries}
    # Check every path against the fp32 reference where its [Hq, m, L] scores fit comfortably.
    small = plan.num_queries * plan.kv_len(0) <= 3e7
    ref = segmented_attention(q.float(), KVCache(kc.float(), vc.float(), slots), plan, "reference") if small else None
    for path in ("per_span", "custom_mask", "spans"):
        if path == "custom_mask" and plan.num_queries * plan.kv_len(0) > 2e9:
            row[path] = float("nan")  # the boolean mask alone would not fit
            continue
        runner = FlashInferHoleAttention(params, dev)
        t0 = time.perf_counter()
        runner.plan(plan, slots, path)
        torch.cuda.synchronize()
        if path == "custom_mask":
            row["plan_ms"] = (time.perf_counter() - t0) * 1e3
        out = runner.run(q, kc, vc)
        if ref is not None:
            err = float((out.float() - ref).norm() / ref.norm())
            assert err < 2e-2, (path, err)
        row[path] = cuda_median_ms(lambda r=runner: r.run(q, kc, vc))
    chosen = choose_path(plan, HQ, HKV, D)
    row["auto_choice"] = chosen
    row["auto"] = row[chosen]
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    stock = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    a = holes[0][0]
    stock.plan(torch.tensor([0, n - a], dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32),
               torch.arange(n, dtype=torch.int32), torch.tensor([1], dtype=torch.int32), HQ, HKV, D, 1,
               causal=True, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    qs = qfull[a:]
    kv = (kc.view(-1, 1, HKV, D), vc.view(-1, 1, HKV, D))
    row["stock"] = cuda_median_ms(lambda: stock.run(qs, kv))
    pairs = sum(s * (a_ + (s + 1) / 2) for a_, e in holes for s in [e - a_])
    x = max(1, round(math.sqrt(2 * pairs)))
    floor = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    floor.plan(torch.tensor([0, x], dtype=torch.int32), torch.tensor([0, x], dtype=torch.int32),
               torch.arange(x, dtype=torch.int32), torch.tensor([1], dtype=torch.int32), HQ, HKV, D, 1,
               causal=True, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    qx = torch.randn(x, HQ, D, device=dev, dtype=torch.bfloat16)
    kx = (torch.randn(x, 1, HKV, D, device=dev, dtype=torch.bfloat16),
          torch.randn(x, 1, HKV, D, device=dev, dtype=torch.bfloat16))
    row["floor"] = cuda_median_ms(lambda: floor.run(qx, kx))
    return row


def gpu_sweep(quick: bool) -> list[dict]:
    cache: dict = {}
    rows = []
    ns = [4096, 16384] if quick else [4096, 16384, 65536]
    for n in ns:
        for k in (1, 4, 16, 64, 256):
            for length in (1, 16, 128, 1024):
                if k * length <= n // 2:
                    rows.append(bench_gpu(n, k, length, cache))
                    r = rows[-1]
                    print(f"n={n} k={k} len={length}: per_span {r['per_span']:.3f} mask {r['custom_mask']:.3f} "
                          f"spans {r['spans']:.3f} auto({r['auto_choice']}) {r['auto']:.3f} "
                          f"stock {r['stock']:.3f} floor {r['floor']:.3f} ms", flush=True)
    return rows


def write_outputs(rows: list[dict], out: Path, device: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys = ["n", "k", "len", "m", "per_span", "custom_mask", "spans", "auto", "auto_choice", "stock", "floor",
            "plan_ms"]
    with open(out / "attention.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [f"Device: {device}. Times in ms per layer (Hq=32, Hkv=8, D=128, bf16).", "",
             "| n | holes × len | per_span | custom_mask | spans | auto (pick) | stock | floor | auto/floor | "
             "per_span/auto |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['k']} × {r['len']} | {r['per_span']:.3f} | {r['custom_mask']:.3f} | "
                     f"{r['spans']:.3f} | {r['auto']:.3f} ({r['auto_choice']}) | {r['stock']:.3f} | "
                     f"{r['floor']:.3f} | {r['auto'] / r['floor']:.2f} | {r['per_span'] / r['auto']:.1f} |")
    (out / "attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(10, 5))
    labels = [f"{r['n'] // 1024}k:{r['k']}×{r['len']}" for r in rows]
    for key in ("per_span", "custom_mask", "spans", "auto", "stock", "floor"):
        ax.plot(range(len(rows)), [r[key] for r in rows], marker="o", label=key)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("ms per layer")
    ax.set_title(f"Segmented prefill, one layer, {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "attention.png", dpi=120)


def cpu_check() -> None:
    print("No CUDA GPU: FlashInfer kernel timings need one (make gpu-check on a CUDA machine).")
    print("Running the pure-torch reference on small sizes instead (fp32, one layer, one run each):")
    print("| n | holes × len | reference ms | dense causal ms (all n queries) |")
    print("|---|---|---|---|")
    for n, k, length in ((512, 4, 16), (2048, 16, 16), (2048, 4, 128)):
        holes = even_holes(n, k, length)
        plan = HolePlan.from_holes([n], [holes])
        kc, vc = torch.randn(n, HKV, D), torch.randn(n, HKV, D)
        qfull = torch.randn(n, HQ, D)
        q = qfull[plan.q_positions]
        t0 = time.perf_counter()
        segmented_attention(q, KVCache(kc, vc, [torch.arange(n)]), plan, "reference")
        t1 = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(
            qfull.transpose(0, 1), kc.transpose(0, 1).repeat_interleave(HQ // HKV, 0),
            vc.transpose(0, 1).repeat_interleave(HQ // HKV, 0), is_causal=True)
        t2 = time.perf_counter()
        print(f"| {n} | {k} × {length} | {(t1 - t0) * 1e3:.1f} | {(t2 - t1) * 1e3:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--quick", action="store_true", help="skip n=64k")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        cpu_check()
        return
    rows = gpu_sweep(args.quick)
    write_outputs(rows, args.out, torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
