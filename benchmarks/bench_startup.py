"""Engine start time and first-request latency on this machine (embedded SmolLM2, CPU).

    .venv/bin/python benchmarks/bench_startup.py [--runs 3]

Start = wall time of ``sglang_holes.Engine(...)`` (model preparation already done,
SGLang imported). First request = a greedy 16-token chat answer right after start.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    import os

    import sglang_holes
    from sglang_holes.model import prepare_embedded_model

    path = str(prepare_embedded_model())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    starts, firsts = [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        eng = sglang_holes.Engine(model_path=path, log_level="error")
        t1 = time.perf_counter()
        out = eng.generate(prompt=prompt, sampling_params={"max_new_tokens": 16, "temperature": 0})
        t2 = time.perf_counter()
        eng.shutdown()
        starts.append(t1 - t0)
        firsts.append(t2 - t1)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores")
    print(f"answer: {out['text']!r}")
    print("| metric | median | min | max |")
    print("|---|---|---|---|")
    for name, xs in (("engine start (s)", starts), ("first request, 16 tokens (s)", firsts)):
        print(f"| {name} | {statistics.median(xs):.2f} | {min(xs):.2f} | {max(xs):.2f} |")


if __name__ == "__main__":
    main()
