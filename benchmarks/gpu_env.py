"""The GPU machine's side of ``gpu_check.py``: logging, the FlashInfer JIT build environment
(CUDA toolkit and pip NVIDIA libraries found and linked), versions, and the kernels prebuilt
in parallel before any check runs."""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from bench_attention import D

T0 = time.monotonic()
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

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
