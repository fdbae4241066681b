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
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # ``tests`` (and ``sglang_holes`` when not installed)

from bench_attention import HKV, HQ, D, cuda_median_ms, even_holes, write_outputs  # noqa: E402

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

T0 = time.monotonic()
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
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


# ----------------------------------------------------------------------------- logging


class _Tee:
    def __init__(self, stream, f):
        self.stream, self.f = stream, f

    def write(self, s):
        self.stream.write(s)
        self.f.write(s)
        self.stream.flush()
        self.f.flush()
        return len(s)

    def flush(self):
        self.stream.flush()
        self.f.flush()

    def isatty(self):
        return False


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def elapsed() -> float:
    return time.monotonic() - T0


def short_error(e: BaseException, limit: int = 240) -> str:
    """One line: the error lines of a failed build (ninja/nvcc/ld output), else the message's start."""
    lines = [" ".join(ln.split()) for ln in str(e).splitlines()
             if re.search(r"error|fatal|cannot find|undefined reference", ln, re.I)]
    text = " / ".join(lines[-3:]) if lines else " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}"


# ----------------------------------------------------------------------------- environment


def _run(cmd: list[str], timeout: float = 20) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _nvidia_pip_dirs(sub: str) -> list[Path]:
    """``<site>/nvidia/*/<sub>`` of the CUDA wheels torch depends on (headers, libraries)."""
    dirs: list[Path] = []
    try:
        import nvidia

        for root in nvidia.__path__:
            dirs += sorted(p for p in Path(root).glob(f"*/{sub}") if p.is_dir())
    except ImportError:
        pass
    return dirs


def _loaded_libs() -> dict[str, str]:
    libs: dict[str, str] = {}
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split()[-1]
            if path.startswith("/") and ".so" in path:
                libs.setdefault(os.path.basename(path), path)
    except OSError:
        pass
    return libs


def _ensure_linkable(name: str, cuda_home: str, linkdir: Path) -> str:
    """Make ``-l<name>`` (in FlashInfer's JIT link line) resolvable; returns what was done."""
    so = f"lib{name}.so"
    dirs = [f"{cuda_home}/lib64", f"{cuda_home}/lib64/stubs", *os.environ.get("LIBRARY_PATH", "").split(":"),
            "/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib64"]
    for d in dirs:
        if d and (Path(d) / so).exists():
            return f"{so}: {d}"
    candidates = [p for base, p in _loaded_libs().items() if base.startswith(so + ".")]
    for line in _run(["ldconfig", "-p"]).splitlines():
        m = re.match(rf"\s*({re.escape(so)}\.\S+) .*=> (\S+)", line)
        if m:
            candidates.append(m.group(2))
    for d in [Path(cuda_home) / "lib64", *_nvidia_pip_dirs("lib")]:
        candidates += [str(p) for p in sorted(d.glob(so + ".*"))]
    if not candidates:
        return f"{so}: NOT FOUND (the JIT link step will fail)"
    linkdir.mkdir(parents=True, exist_ok=True)
    link = linkdir / so
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(candidates[0])
    return f"{so} -> {candidates[0]} (symlinked in {linkdir})"


def setup_jit_env(cap: tuple[int, int]) -> dict[str, str]:
    """Environment for FlashInfer's JIT (before ``import flashinfer``); returns what it set or found."""
    notes: dict[str, str] = {}
    arch = f"{cap[0]}.{cap[1]}"
    os.environ.setdefault("FLASHINFER_CUDA_ARCH_LIST", arch)  # this GPU's arch only
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", arch)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    path = os.environ.get("PATH", "")
    if not shutil.which("ninja"):
        extra = [os.path.dirname(sys.executable)]
        try:
            import ninja

            extra.append(ninja.BIN_DIR)
        except (ImportError, AttributeError):
            pass
        os.environ["PATH"] = os.pathsep.join([*extra, path])
    notes["ninja"] = shutil.which("ninja") or "NOT FOUND"
    nvcc = shutil.which("nvcc")
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
        # FlashInfer takes dirname(dirname(which nvcc)): wrong when nvcc is a link or a wrapper
        # script in /usr/local/bin. Take the first toolkit folder that has nvcc and the headers.
        homes = [Path(nvcc).resolve().parent.parent] if nvcc else []
        homes += [Path("/usr/local/cuda"), *sorted(Path("/usr/local").glob("cuda-*"), reverse=True)]
        for home in homes:
            if (home / "bin/nvcc").exists() and (home / "include/cuda_runtime.h").exists():
                os.environ["CUDA_HOME"] = str(home)
                break
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or ""
    notes["CUDA_HOME"] = cuda_home
    notes["nvcc"] = nvcc or (f"{cuda_home}/bin/nvcc" if Path(cuda_home, "bin/nvcc").exists() else "NOT FOUND")
    inc = Path(cuda_home) / "include"
    if not (inc / "cuda_runtime.h").exists():
        notes["headers"] = f"{inc}/cuda_runtime.h NOT FOUND"
    # FA3 includes cutlass/util/.../tensor_fill.h -> curand_kernel.h: take it from the nvidia-curand
    # wheel when the toolkit has no curand headers (appended, so the toolkit's own headers win).
    if not (inc / "curand_kernel.h").exists():
        found = [d for d in _nvidia_pip_dirs("include") if (d / "curand_kernel.h").exists()]
        if found:
            os.environ["FLASHINFER_EXTRA_CUDAFLAGS"] = (
                os.environ.get("FLASHINFER_EXTRA_CUDAFLAGS", "") + f" -isystem {found[0]}").strip()
        notes["curand_kernel.h"] = str(found[0]) if found else "NOT FOUND (FA3 modules will not compile)"
    linkdir = Path(tempfile.gettempdir()) / "gpu_check_libs"
    for lib in ("cuda", "cudart"):
        notes[f"-l{lib}"] = _ensure_linkable(lib, cuda_home, linkdir)
    if any(" -> " in notes[f"-l{lib}"] for lib in ("cuda", "cudart")):
        os.environ["FLASHINFER_EXTRA_LDFLAGS"] = (os.environ.get("FLASHINFER_EXTRA_LDFLAGS", "")
                                                  + f" -L{linkdir}").strip()
    for k in ("FLASHINFER_CUDA_ARCH_LIST", "MAX_JOBS", "FLASHINFER_WORKSPACE_BASE", "FLASHINFER_EXTRA_CUDAFLAGS",
              "FLASHINFER_EXTRA_LDFLAGS", "FLASHINFER_NVCC_THREADS"):
        if os.environ.get(k):
            notes[k] = os.environ[k]
    return notes


def versions(flashinfer) -> dict[str, str]:
    from importlib import metadata

    props = torch.cuda.get_device_properties(0)
    out = {
        "gpu": torch.cuda.get_device_name(0),
        "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(0)),
        "sms": str(props.multi_processor_count),
        "gpu_memory_gib": f"{props.total_memory / 2**30:.0f}",
        "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).split("\n")[0],
        "torch": torch.__version__,
        "torch_cuda": str(torch.version.cuda),
        "python": platform.python_version(),
        "cpus": str(os.cpu_count()),
        "flashinfer": getattr(flashinfer, "__version__", "?") if flashinfer else "not importable",
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "absent"
    m = re.search(r"release ([\d.]+), V([\d.]+)", _run([os.environ.get("CUDA_HOME", "") + "/bin/nvcc", "--version"])
                  or _run(["nvcc", "--version"]))
    out["nvcc"] = m.group(2) if m else "?"
    # tvm-ffi JIT-builds a torch addon at import when torch lacks the DLPack C exchange API
    out["torch_dlpack_c_api"] = str(any(hasattr(torch.Tensor, a) for a in
                                        ("__dlpack_c_exchange_api__", "__c_dlpack_exchange_api__")))
    for dist in ("apache-tvm-ffi", "ninja"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


# ----------------------------------------------------------------------------- JIT


def jit_specs(dev: torch.device, extras: bool) -> list[tuple[str, object]]:
    """(label, JitSpec) of every module the checks load; names equal what plan() asks for."""
    from flashinfer.jit.attention.modules import gen_batch_prefill_module
    from flashinfer.jit.quantization import gen_quantization_module

    try:
        from flashinfer.utils import determine_attention_backend

        be_mask = determine_attention_backend(dev, 0, False, True, torch.bfloat16, torch.bfloat16)
        be_causal = determine_attention_backend(dev, 0, False, False, torch.bfloat16, torch.bfloat16)
    except Exception:  # an API change: guess (FA3 needs sm90 and no custom mask)
        be_mask, be_causal = "fa2", ("fa3" if torch.cuda.get_device_capability(dev)[0] == 9 else "fa2")
    # Slowest first (an FA3 module is ~5x an FA2 one), so that the workers finish together.
    variants = [(be_causal, "bf16", False, False), (be_causal, "fp16", False, False)]
    if extras:  # custom mask: the window is folded into the mask, so only the soft cap is a kernel flag
        variants.append((be_causal, "bf16", True, True))
    variants += [(be_mask, "bf16", False, False), (be_mask, "fp16", False, False)]
    if extras:
        variants.append((be_mask, "bf16", False, True))
    specs = []
    for be, dn, swa, cap in variants:
        dt = DTYPES[dn]
        label = f"{be} {dn}" + (" window+softcap" if swa else " softcap" if cap else "")
        specs.append((label, gen_batch_prefill_module(be, dt, dt, dt, torch.int32, D, D, 0, swa, cap, False)))
    specs.append(("segment_packbits", gen_quantization_module()))
    return specs


def install_jit_guard(state: dict) -> None:
    """Wrap ``JitSpec.build``: a module whose build failed once fails at once afterwards (instead
    of every plan() recompiling it for minutes), and builds on first use are logged."""
    from flashinfer.jit.core import JitSpec

    orig = JitSpec.build
    failed: dict[str, str] = state.setdefault("jit_failed", {})

    def build(self, *args, **kwargs):
        if self.name in failed:
            raise RuntimeError(f"JIT build of {self.name} failed before: {failed[self.name]}")
        fresh = not self.jit_library_path.exists()
        t = time.monotonic()
        try:
            return orig(self, *args, **kwargs)
        except Exception as e:
            failed[self.name] = short_error(e, 200)
            raise
        finally:
            if fresh and not state.get("in_prebuild"):
                log(f"JIT: {self.name} built on first use ({time.monotonic() - t:.0f} s)")

    JitSpec.build = build


def prebuild(specs: list[tuple[str, object]], workers: int) -> list[dict]:
    """Build the modules concurrently, each with its own ninja in its own build dir (as
    ``build_and_load`` does later: a shared top-level ninja would leave no per-dir ninja log
    and plan() would compile everything again), ``MAX_JOBS`` split among the workers."""
    cpus = os.cpu_count() or 4
    workers = max(1, min(workers, len(specs)))
    saved = os.environ.get("MAX_JOBS")
    # 1.5x oversubscribed: a worker on its last files leaves cores to the others.
    os.environ["MAX_JOBS"] = str(max(1, math.ceil(1.5 * cpus / workers)))
    results = [{"module": label, "name": spec.name} for label, spec in specs]

    def build(i: int) -> None:
        spec, r = specs[i][1], results[i]
        t = time.monotonic()
        try:
            spec.build(verbose=False)
            r["ok"] = True
        except Exception as e:
            r["ok"] = False
            r["error"] = short_error(e, 400)
            r["error_tail"] = str(e)[-4000:]
        r["seconds"] = round(time.monotonic() - t, 1)
        log(f"JIT {r['module']}: {'built' if r['ok'] else 'FAILED'} in {r['seconds']} s")

    log(f"JIT: building {len(specs)} modules, {workers} at a time, MAX_JOBS={os.environ['MAX_JOBS']} each")
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(build, i) for i in range(len(specs))]
        next_report = time.monotonic() + 20
        while not all(f.done() for f in futures):
            time.sleep(0.5)
            if time.monotonic() >= next_report:
                next_report += 20
                objs = sum(len(list(spec.build_dir.glob("*.o"))) for _, spec in specs)
                total = sum(len(spec.sources) for _, spec in specs)
                log(f"JIT: {sum(f.done() for f in futures)}/{len(specs)} modules, {objs}/{total} objects compiled")
    if saved is None:
        os.environ.pop("MAX_JOBS", None)
    else:
        os.environ["MAX_JOBS"] = saved
    for r in results:
        if not r["ok"]:
            print(f"--- JIT {r['module']} failed; ninja output tail:\n{r.get('error_tail', '')}", flush=True)
    return results


def built_modules(specs: list[tuple[str, object]]) -> list[str]:
    """Modules in the JIT dir that the prebuild did not make (built lazily by plan())."""
    try:
        from flashinfer.jit import env as jit_env

        names = {spec.name for _, spec in specs}
        return sorted(p.name for p in jit_env.FLASHINFER_JIT_DIR.iterdir()
                      if p.is_dir() and p.name not in names and any(p.glob("*.so")))
    except Exception:
        return []


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


# ----------------------------------------------------------------------------- report


def _fmt(x, spec=".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ratio(a, b) -> str:
    if a is None or b is None or any(isinstance(v, float) and (math.isnan(v) or v == 0) for v in (a, b)):
        return "–"
    return f"{a / b:.3g}"


def report(res: dict) -> str:
    v = res.get("versions", {})
    lines = [f"## gpu_check: {v.get('gpu', '?')} ({v.get('capability', '?')}, {v.get('sms', '?')} SMs, "
             f"driver {v.get('driver', '?')})", "",
             f"torch {v.get('torch')} (CUDA {v.get('torch_cuda')}), triton {v.get('triton')}, nvcc {v.get('nvcc')}, "
             f"**flashinfer {v.get('flashinfer')}**, apache-tvm-ffi {v.get('apache-tvm-ffi')}, "
             f"python {v.get('python')}, {v.get('cpus')} CPUs."]
    jit = res.get("jit", [])
    if jit:
        failed = [j["module"] for j in jit if not j.get("ok")]
        lines.append(f"JIT: {len(jit)} modules prebuilt in {res.get('jit_seconds', 0):.0f} s"
                     + (f", FAILED: {', '.join(failed)}" if failed else "")
                     + (f"; built later by plan(): {len(res['jit_lazy'])}" if res.get("jit_lazy") else "") + ".")
        lines += [f"- JIT {j['module']}: `{j.get('error', '')}`" for j in jit if not j.get("ok")]
    lines.append("")
    recs = res.get("correctness", [])
    if recs:
        lines += ["### Correctness: ‖out − ref‖ / ‖ref‖ against the fp32 reference; pass ≤ " + f"{TOL:g}", "",
                  "| case | sequences | holes | m | P | dtype | " + " | ".join(BACKENDS) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(BACKENDS)]
        keys: list[tuple] = []
        for r in recs:
            key = (r["case"], r["page_size"], r["dtype"])
            if key not in keys:
                keys.append(key)
        for key in keys:
            rs = {r["backend"]: r for r in recs if (r["case"], r["page_size"], r["dtype"]) == key}
            r0 = next(iter(rs.values()))
            cells = []
            for b in BACKENDS:
                r = rs.get(b)
                if r is None:
                    cells.append("–")
                    continue
                cell = (f"{r['err']:.1e}" if r["err"] is not None else "error") + (" ✓" if r["ok"] else " ✗")
                if b == "auto":
                    cell += f" ({r['pick']})"
                cells.append(cell)
            seqs = "+".join(str(s) for s in r0["seq_lens"])
            label = key[0] + (" (window {window_left}, cap {logits_soft_cap:g}, scale {sm_scale:g})".format(
                **r0["attn"]) if r0["attn"] else "")
            lines.append(f"| {label} | {seqs} | {r0['holes']} | {r0['m']} | {key[1]} | {key[2]} | "
                         + " | ".join(cells) + " |")
        n_ok = sum(r["ok"] for r in recs)
        lines += ["", f"**{n_ok}/{len(recs)} checks pass**" + (" (all)" if n_ok == len(recs) else "") + "."]
        errors = sorted({r["error"] for r in recs if "error" in r})
        for e in errors[:5]:
            lines.append(f"- error: `{e}`")
        lines.append("")
    rows = res.get("bench", [])
    if rows:
        lines += [f"### Kernel timings (ms per layer; Hq={HQ}, Hkv={HKV}, D={D}, bf16, page size 1; median of "
                  f"{res['args']['iters']} CUDA-event timings after {res['args']['warmup']} warm-ups).", "",
                  "full = dense causal prefill of all n tokens; stock = recompute from the first hole (SGLang "
                  "today); m only = causal prefill of the m missing tokens alone (no cached context); floor = "
                  "dense prefill with the holes' attention FLOPs.", "",
                  "| n | holes × len | missing | per_span | custom_mask | spans | auto (pick) | full | stock | "
                  "m only | floor | auto/full | auto/stock | auto/m only | auto/floor | per_span/auto |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(
                f"| {r['n']} | {r['k']} × {r['len']} | {r['missing_pct']:g}% | {_fmt(r['per_span'])} | "
                f"{_fmt(r['custom_mask'])} | {_fmt(r['spans'])} | {_fmt(r['auto'])} ({r['auto_choice']}) | "
                f"{_fmt(r['full'])} | {_fmt(r['stock'])} | {_fmt(r['m_only'])} | {_fmt(r['floor'])} | "
                f"{_ratio(r['auto'], r['full'])} | {_ratio(r['auto'], r['stock'])} | "
                f"{_ratio(r['auto'], r['m_only'])} | {_ratio(r['auto'], r['floor'])} | "
                f"{_ratio(r['per_span'], r['auto'])} |")
        bad = [f"{r['n']}/{r['k']}×{r['len']} {p} {r[f'err_{p}']:.1e}" for r in rows
               for p in ("per_span", "custom_mask", "spans") if r.get(f"err_{p}", 0) > TOL]
        if bad:
            lines.append(f"\nBench outputs off the reference (> {TOL:g}): " + ", ".join(bad))
        if res.get("bench_skipped"):
            lines.append(f"\n{len(res['bench_skipped'])} configs skipped (time budget).")
        lines.append("")
    pt = res.get("pytest")
    if pt:
        lines += [f"pytest tests/test_gpu_flashinfer.py: {pt['summary']} ({pt['seconds']} s).", ""]
    status = "PASS" if res.get("ok") else "FAIL"
    lines.append(f"**{status}** in {res.get('seconds', elapsed()):.0f} s."
                 + (f" {res['failure']}" if res.get("failure") else ""))
    return "\n".join(lines) + "\n"


def save(res: dict, out: Path) -> None:
    res["seconds"] = round(elapsed(), 1)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str) + "\n")


# ----------------------------------------------------------------------------- main


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
