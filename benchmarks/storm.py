"""The RAG-server storm of issue 19, on the default model: many clients, every request kind, a small pool.

    .venv/bin/python benchmarks/storm.py [--clients 32] [--pool 9000] [--chunk 256] [--model DIR] [--out DIR]

Starts ``sglang-holes serve`` (the embedded SmolLM2-135M unless ``--model``; CPU, fp32,
chunked prefill ``--chunk``, a ``--pool``-token KV pool, live pool audit on) and runs the
workload of ``tests/test_load_soak.py`` (``tests/load_storm.py``) from ``--clients`` threads:
plain and hole prompts with ``/holes/evict`` in between, chunk requests through ``kv_hints``
and chat content parts under every policy, long decodes, aborts and hang-ups. Every answer is
compared with its reference (the request served alone after a flush; top-5 logprobs within
1e-4). Reports mismatches, the pool audit after the storm, whether a flush gives every slot
back, and what the storm exercised. Writes storm.md (and storm.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_startup import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from tests.live_server import start_server  # noqa: E402
from tests.load_storm import _workload, storm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--pool", type=int, default=9000)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--model", type=Path, default=None, help="an HF model folder (default: the embedded SmolLM2)")
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if args.model is None:
        from sglang_holes.model import prepare_embedded_model

        args.model = prepare_embedded_model()
    import random

    n_jobs = len(_workload(random.Random(args.seed))[0])
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        server = start_server(args.model, log, "--chunked-prefill-size", str(args.chunk), pool=args.pool)
        try:
            with tqdm(total=n_jobs, desc=f"storm, {args.clients} clients", unit="req") as bar:
                result = storm(server, clients=args.clients, seed=args.seed, time_limit_s=3600, progress=bar)
            alive = server.alive()
            whole = None
            if alive:
                server.flush()
                c = server.cache()
                whole = (c["available"], c["evictable"], c["protected"]) == (server.pool, 0, 0)
        finally:
            server.stop()
    t = result.tally
    row = {"clients": args.clients, "pool": args.pool, "chunk": args.chunk, "model": args.model.name,
           "jobs": result.jobs, "checked": t.checked, "mismatches": t.mismatches, "alive": alive,
           "integrity": result.after.get("integrity"), "pool_whole_after_flush": whole,
           "retracted": result.retracted, "evicted_tokens": t.evicted, "evict_refused": t.refused,
           "reused_chunks": t.reused_chunks, "aborted": t.aborted, "seconds": round(result.seconds, 1),
           "hole_requests": result.after.get("stats", {}).get("hole_requests", 0)
           - result.before.get("stats", {}).get("hole_requests", 0), "machine": cpu_name()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "storm.json").write_text(json.dumps(row, indent=2) + "\n")
    cmd = f"python benchmarks/storm.py --clients {args.clients} --pool {args.pool} --chunk {args.chunk}"
    checked = sum(t.checked.values())
    kinds = ", ".join(f"{k} {v}" for k, v in t.checked.items())
    lines = [
        "# Load storm (issue 19)", "",
        f"`{cmd}` on {row['machine']}, {args.model.name} (fp32, CPU, torch_native), live pool audit on.", "",
        "| what | result |", "|---|---|",
        f"| answers compared with their reference | {checked} ({kinds}) |",
        f"| answers different from their reference | {len(t.mismatches)} |",
        f"| server alive after the storm | {alive} |",
        f"| pool audit after the storm | {row['integrity']} |",
        f"| every slot back after a flush | {whole} |",
        f"| hole requests / evicted tokens / evictions refused | {row['hole_requests']} / {t.evicted} / {t.refused} |",
        f"| chunks reused by kv_hints requests | {t.reused_chunks} |",
        f"| aborts / retractions | {t.aborted} / {result.retracted} |",
        f"| storm wall time | {row['seconds']} s for {n_jobs} jobs |", "",
    ]
    if t.mismatches:
        lines += ["Mismatches:", "", *[f"- {m}" for m in t.mismatches[:20]], ""]
    (args.out / "storm.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
