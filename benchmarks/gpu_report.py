"""The report of ``gpu_check.py``: one markdown file from its JSON results."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench_attention import HKV, HQ, D
from gpu_env import elapsed

from tests.test_gpu_flashinfer import BACKENDS, TOL

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
