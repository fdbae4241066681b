"""GPU check in one call: the FlashInfer paths against the reference, then the kernel benchmark.

    python3 benchmarks/gpu_check.py --out DIR [--bench few|quick|full|none] [--budget-s 480]

For a CUDA machine that has torch, triton and nvcc but no SGLang, no FlashInfer and no
network (``make gpu-wheels`` here, then ``make gpu-check`` there; results: benchmarks/results/gpu_h200.md).
``sglang_holes`` is imported from the repository root, FlashInfer from the carried wheels.
In one process it

1. prints the GPU and the torch / CUDA / triton / nvcc / FlashInfer versions;
2. JIT-builds, up front and in parallel, the FlashInfer modules it needs for this GPU's
   arch only: batch prefill at head_dim 128 in fp16 and bf16 for the custom-mask backend
   (FA2) and the causal one (FA3 on Hopper), one bf16 pair with sliding window and
   logits soft cap, and the bit-packing module;
3. correctness: every FlashInfer path of ``segmented_attention`` (custom_mask, spans,
   per_span, auto) against the fp32 ``reference`` path on the cases of
   tests/test_gpu_flashinfer.py, fp16 and bf16, page sizes 1 and 16, plus window + soft
   cap + scale in bf16; a check passes when ||out - ref|| / ||ref|| <= 1e-2;
4. timing: bench_attention.py's measurement (one layer, Hq=32, Hkv=8, D=128, bf16, page
   size 1, median of CUDA-event timings after warm-up) on a few (n, holes, length)
   configs, against a dense causal prefill of all n tokens, SGLang's stock recompute
   from the first hole, a prefill of only the m missing tokens and the equal-FLOPs floor;
5. runs tests/test_gpu_flashinfer.py under pytest when time is left;
6. prints a short markdown table last, and writes gpu_check.md, gpu_check.json,
   gpu_check.log and bench_attention's attention.{md,csv,png} under --out.

Exit status: 0 every check passed; 1 a check failed (the table is still printed);
2 no CUDA device (nothing is checked: safe to run anywhere); 3 FlashInfer missing or broken.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # ``tests`` (and ``sglang_holes`` when not installed)

from bench_attention import HKV, HQ, D, cuda_median_ms, even_holes, write_outputs  # noqa: E402
from gpu_env import (  # noqa: E402
    DTYPES,
    _Tee,
    built_modules,
    elapsed,
    install_jit_guard,
    jit_specs,
    log,
    prebuild,
    setup_jit_env,
    short_error,
    versions,
)
from gpu_report import report, save  # noqa: E402

from sglang_holes import AttentionParams, FlashInferHoleAttention, HolePlan, choose_path, segmented_attention  # noqa: E402
from sglang_holes.attention import KVCache, Scoring  # noqa: E402
from tests.holes_data import rel_err  # noqa: E402
from tests.test_gpu_flashinfer import (  # noqa: E402
    ATTN_EXTRAS,
    BACKENDS,
    CASES,
    EXTRAS_CASE,
    TOL,
    make_gpu_inputs,
)

PAGE_SIZES = (1, 16)
# (n, holes, hole length): short prompts to 64k, one long hole to 256 single tokens.
FEW = [(4096, 4, 16), (4096, 16, 128), (4096, 1, 1024), (16384, 1, 1), (16384, 16, 16), (16384, 64, 128),
       (16384, 4, 1024), (16384, 256, 1), (65536, 16, 128), (65536, 256, 16), (65536, 4, 1024)]
MASK_LIMIT = 2e9  # custom_mask: m * kv_len booleans beyond this are not built (as in bench_attention)
REF_LIMIT = 3e7  # bench: check against the reference where its [Hq, m, L] scores fit comfortably


def bench_configs(which: str) -> list[tuple[int, int, int]]:
    if which == "none":
        return []
    if which == "few":
        return list(FEW)
    ns = [4096, 16384] if which == "quick" else [4096, 16384, 65536]  # bench_attention's sweep
    return [(n, k, ln) for n in ns for k in (1, 4, 16, 64, 256) for ln in (1, 16, 128, 1024) if k * ln <= n // 2]


def correctness_cases(extras: bool) -> list[dict]:
    """Every (case, dtype, page size) of the GPU tests; each runs all FlashInfer paths."""
    out = []
    for ci, (seq_lens, holes) in enumerate(CASES):
        for dname in DTYPES:
            for P in PAGE_SIZES:
                out.append({"case": str(ci), "idx": ci, "seq_lens": seq_lens, "holes": sum(map(len, holes)),
                            "dtype": dname, "page_size": P, "attn": {}})
    if extras:
        seq_lens, holes = CASES[EXTRAS_CASE]
        for P in PAGE_SIZES:
            out.append({"case": f"{EXTRAS_CASE}w", "idx": EXTRAS_CASE, "seq_lens": seq_lens,
                        "holes": sum(map(len, holes)), "dtype": "bf16", "page_size": P, "attn": dict(ATTN_EXTRAS)})
    return out


# ----------------------------------------------------------------------------- correctness


def _attempt(ref: torch.Tensor, *args, **kwargs) -> dict:
    """``segmented_attention(*args, **kwargs)`` against ``ref``: rel err, pass, seconds or the error."""
    t = time.perf_counter()
    try:
        out = segmented_attention(*args, **kwargs)
        torch.cuda.synchronize()
        err = rel_err(out.float(), ref)
        r = {"err": err, "ok": math.isfinite(err) and err <= TOL and out.shape == ref.shape}
    except Exception as e:
        r = {"err": None, "ok": False, "error": short_error(e)}
        try:
            torch.cuda.synchronize()
        except Exception as e2:  # a sticky CUDA error: every later check fails too
            r["error"] += f" (then {short_error(e2, 120)})"
    r["seconds"] = round(time.perf_counter() - t, 3)
    return r


def run_correctness(cases: list[dict], dev: torch.device, state: dict, records: list[dict]) -> None:
    """Every FlashInfer path on every case into ``records`` (appended as they finish)."""
    for c in cases:
        seq_lens, holes = CASES[c["idx"]]
        dt = DTYPES[c["dtype"]]
        plan, q, kc, vc, slots = make_gpu_inputs(seq_lens, holes, c["page_size"], dt, seed=c["idx"], device=dev)
        attn = c["attn"]
        ref = segmented_attention(q.float(), KVCache(kc.float(), vc.float(), slots), plan, "reference",
                                  scoring=Scoring(**attn))
        torch.cuda.synchronize()
        kv_bytes = torch.empty((), dtype=dt).element_size()
        parts = []
        for backend in BACKENDS:
            pick = choose_path(plan, HQ, HKV, D, kv_bytes) if backend == "auto" else backend
            rec = {k: v for k, v in c.items() if k != "idx"} | {"m": plan.num_queries, "backend": backend,
                                                                 "pick": pick}
            rec.update(_attempt(ref, q, KVCache(kc, vc, slots), plan, backend, scoring=Scoring(**attn)))
            records.append(rec)
            cell = f"{rec['err']:.1e}" if rec["err"] is not None else "error"
            parts.append(f"{backend}{'(' + pick + ')' if backend == 'auto' else ''} {cell}"
                         f"{'' if rec['ok'] else ' FAIL'} [{rec['seconds']:.1f}s]")
        log(f"case {c['case']} {c['dtype']} P={c['page_size']} m={plan.num_queries}: " + " | ".join(parts))
        for rec in records[-len(BACKENDS):]:
            if "error" in rec:
                log(f"  {rec['backend']}: {rec['error']}")
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- timing


def run_bench(configs: list[tuple[int, int, int]], dev: torch.device, state: dict, args, rows: list[dict]) -> None:
    """Time every config into ``rows`` (appended as they finish, so a crash keeps the earlier ones)."""
    import flashinfer

    params = AttentionParams(HQ, HKV, D, torch.bfloat16, torch.bfloat16)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    dense = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    cache: dict[int, tuple[torch.Tensor, ...]] = {}

    def time_fn(fn) -> float:
        return cuda_median_ms(fn, warmup=args.warmup, iters=args.iters)

    def dense_causal_ms(qf: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, qlen: int, kvlen: int) -> float:
        """One causal prefill of ``qlen`` queries over ``kvlen`` keys (bottom-right aligned)."""
        dense.plan(torch.tensor([0, qlen], dtype=torch.int32), torch.tensor([0, kvlen], dtype=torch.int32),
                   torch.arange(kvlen, dtype=torch.int32), torch.tensor([1], dtype=torch.int32), HQ, HKV, D, 1,
                   causal=True, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        qs = qf[:qlen]
        kv = (kc[:kvlen].view(-1, 1, HKV, D), vc[:kvlen].view(-1, 1, HKV, D))
        return time_fn(lambda: dense.run(qs, kv))

    for i, (n, k, length) in enumerate(configs):
        if elapsed() > args.budget_s - 25:
            log(f"bench: time budget reached, {len(configs) - i} configs skipped")
            state["bench_skipped"] = configs[i:]
            break
        holes = even_holes(n, k, length)
        plan = HolePlan.from_holes([n], [holes])
        m, L = plan.num_queries, plan.kv_len(0)
        row: dict = {"n": n, "k": k, "len": length, "m": m, "missing_pct": round(100 * m / n, 2)}
        if n not in cache:
            cache.clear()
            g = torch.Generator(device=dev).manual_seed(0)
            cache[n] = tuple(torch.randn(n, h, D, device=dev, dtype=torch.bfloat16, generator=g)
                             for h in (HKV, HKV, HQ))
        kc, vc, qfull = cache[n]
        slots = [torch.arange(n)]
        q = qfull[plan.q_positions.to(dev)]
        ref = (segmented_attention(q.float(), KVCache(kc.float(), vc.float(), slots), plan, "reference")
               if m * L <= REF_LIMIT else None)
        for path in ("per_span", "custom_mask", "spans"):
            if path == "custom_mask" and m * L > MASK_LIMIT:
                row[path] = float("nan")  # the boolean mask alone would not fit
                continue
            try:
                runner = FlashInferHoleAttention(params, dev)
                t = time.perf_counter()
                runner.plan(plan, slots, path)
                torch.cuda.synchronize()
                row[f"plan_ms_{path}"] = round((time.perf_counter() - t) * 1e3, 3)
                out = runner.run(q, kc, vc)
                if ref is not None:
                    row[f"err_{path}"] = rel_err(out.float(), ref)
                row[path] = time_fn(lambda r=runner, q=q, kc=kc, vc=vc: r.run(q, kc, vc))
                del runner, out
            except Exception as e:
                row[path] = float("nan")
                row[f"error_{path}"] = short_error(e)
        row["plan_ms"] = row.get("plan_ms_custom_mask", float("nan"))
        row["auto_choice"] = choose_path(plan, HQ, HKV, D)
        row["auto"] = row[row["auto_choice"]]
        a = holes[0][0]
        pairs = sum(s * (a_ + (s + 1) / 2) for a_, e in holes for s in [e - a_])
        x = min(n, max(1, round(math.sqrt(2 * pairs))))
        for key, qlen, kvlen in (("full", n, n), ("stock", n - a, n), ("m_only", m, m), ("floor", x, x)):
            try:
                row[key] = dense_causal_ms(qfull, kc, vc, qlen, kvlen)
            except Exception as e:
                row[key] = float("nan")
                row[f"error_{key}"] = short_error(e)
        rows.append(row)
        errs = " ".join(f"{p}={row[f'err_{p}']:.1e}" for p in ("per_span", "custom_mask", "spans")
                        if f"err_{p}" in row)
        log(f"bench n={n} k={k} len={length} ({row['missing_pct']}% missing): per_span {row['per_span']:.3f} "
            f"custom_mask {row['custom_mask']:.3f} spans {row['spans']:.3f} auto({row['auto_choice']}) "
            f"{row['auto']:.3f} | full {row['full']:.3f} stock {row['stock']:.3f} m_only {row['m_only']:.3f} "
            f"floor {row['floor']:.3f} ms" + (f" | err {errs}" if errs else ""))
        for key in [k_ for k_ in row if k_.startswith("error_")]:
            log(f"  {key[6:]}: {row[key]}")
    cache.clear()
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- pytest


def run_pytest(timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu_flashinfer.py"]
    log(f"pytest: {' '.join(cmd[2:])} (timeout {timeout:.0f} s)")
    t = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        raw = e.stdout or ""
        out, rc = raw.decode(errors="replace") if isinstance(raw, bytes) else raw, -1
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    summary = lines[-1].strip("= ") if lines else "no output"
    if rc == -1:
        summary = f"timed out after {timeout:.0f} s"
    print("\n".join(lines[-25:]), flush=True)
    return {"rc": rc, "summary": summary, "seconds": round(time.monotonic() - t, 1), "ok": rc == 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu_check"),
                    help="flat output folder (default: $OUT or /tmp/gpu_check)")
    ap.add_argument("--bench", choices=["few", "quick", "full", "none"], default="few",
                    help="timing configs: few (11, default), bench_attention's quick (30) or full sweep, none")
    ap.add_argument("--budget-s", type=float, default=480,
                    help="seconds from start after which remaining bench configs and pytest are skipped")
    ap.add_argument("--iters", type=int, default=20, help="timed runs per measurement (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-extras", action="store_true", help="skip the window + soft cap + scale variants")
    ap.add_argument("--no-pytest", action="store_true", help="do not run tests/test_gpu_flashinfer.py at the end")
    ap.add_argument("--jit-workers", type=int, default=3, help="modules built at once (MAX_JOBS split among them)")
    ap.add_argument("--list", action="store_true", help="print the checks and configs and exit (no GPU needed)")
    args = ap.parse_args()

    cases = correctness_cases(not args.no_extras)
    configs = bench_configs(args.bench)
    if args.list:
        for c in cases:
            print(f"correctness case {c['case']}: seq_lens={c['seq_lens']} holes={c['holes']} {c['dtype']} "
                  f"P={c['page_size']} {c['attn'] or ''} paths={BACKENDS}")
        for n, k, ln in configs:
            print(f"bench n={n} holes={k} len={ln} missing={100 * k * ln / n:g}%")
        return 0
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False); "
              "the FlashInfer kernels can only be checked on an NVIDIA GPU: nothing done.", flush=True)
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    logf = open(args.out / "gpu_check.log", "w")  # open for the whole run
    sys.stdout, sys.stderr = _Tee(sys.__stdout__, logf), _Tee(sys.__stderr__, logf)
    torch.set_float32_matmul_precision("highest")  # the fp32 reference must not use TF32
    dev = torch.device("cuda")
    res: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                 "ok": False}
    state: dict = {}
    res["env"] = setup_jit_env(torch.cuda.get_device_capability(0))
    torch.cuda.init()
    t = time.monotonic()
    try:
        import flashinfer

        log(f"import flashinfer: {time.monotonic() - t:.1f} s")
    except Exception as e:
        flashinfer = None
        res["failure"] = f"import flashinfer failed: {short_error(e)}"
    res["versions"] = versions(flashinfer)
    log("gpu_check: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()))
    log("JIT env: " + "; ".join(f"{k}={v}" for k, v in res["env"].items()))
    if flashinfer is None:
        log(res["failure"])
        save(res, args.out)
        print(report(res), flush=True)
        return 3
    failures: list[str] = []
    try:
        install_jit_guard(state)
        specs = jit_specs(dev, not args.no_extras)
        t = time.monotonic()
        state["in_prebuild"] = True
        res["jit"] = prebuild(specs, args.jit_workers)
        state["in_prebuild"] = False
        res["jit_seconds"] = round(time.monotonic() - t, 1)
        if not all(j["ok"] for j in res["jit"]):
            failures.append("JIT build failed")
    except Exception as e:
        specs, state["in_prebuild"] = [], False
        log(f"JIT prebuild skipped ({short_error(e)}); modules build on first use")
        traceback.print_exc()
    save(res, args.out)

    log(f"correctness: {len(cases)} (case, dtype, page size) x {len(BACKENDS)} paths")
    res["correctness"] = []
    try:
        run_correctness(cases, dev, state, res["correctness"])
    except Exception as e:
        failures.append(f"correctness crashed: {short_error(e)}")
        traceback.print_exc()
    res["jit_lazy"] = built_modules(specs)
    res["jit_failed"] = state.get("jit_failed", {})
    if res["jit_lazy"]:
        log(f"modules built lazily by plan() (not prebuilt): {res['jit_lazy']}")
    bad = [r for r in res["correctness"] if not r["ok"]]
    if bad:
        failures.append(f"{len(bad)} correctness checks failed")
    save(res, args.out)

    if configs:
        log(f"bench: {len(configs)} configs")
        res["bench"] = []
        try:
            run_bench(configs, dev, state, args, res["bench"])
        except Exception as e:
            failures.append(f"bench crashed: {short_error(e)}")
            traceback.print_exc()
        res["bench_skipped"] = state.get("bench_skipped", [])
        if res["bench"]:
            try:
                write_outputs(res["bench"], args.out, f"{res['versions']['gpu']}, flashinfer {flashinfer.__version__}")
            except Exception as e:
                log(f"bench_attention.write_outputs failed: {short_error(e)}")
        save(res, args.out)

    if not args.no_pytest:
        left = args.budget_s - elapsed()
        if left > 90:
            res["pytest"] = run_pytest(left - 15)
            if not res["pytest"]["ok"]:
                failures.append("pytest failed")
        else:
            log(f"pytest skipped: {left:.0f} s of the budget left")

    res["ok"] = not failures
    res["failure"] = "; ".join(failures)
    save(res, args.out)
    text = report(res)
    (args.out / "gpu_check.md").write_text(text)
    print("\n" + text, flush=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
