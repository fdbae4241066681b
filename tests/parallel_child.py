"""A data- or tensor-parallel engine in a child process (``python -m tests.parallel_child dp|tp MODEL``).

The test session keeps its engines alive until it ends (``sglang.Engine.shutdown`` kills every
SGLang subprocess of its process); engines of several ranks each would hold memory the later
tests need, so ``tests/test_parallel.py`` runs them here and reads one JSON line back.
"""

from __future__ import annotations

import json
import os
import random
import sys

SAMPLING = {"max_new_tokens": 3, "temperature": 0.0}


def _ranks(eng) -> list[dict]:
    return [s["sglang_holes"] for s in eng.get_server_info()["internal_states"]]


def _gen(eng, ids: list[int]) -> dict:
    out = eng.generate(input_ids=ids, sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5)
    return {"output_ids": out["output_ids"], "top": out["meta_info"]["output_top_logprobs"],
            "hole_spans": out["meta_info"]["hole_spans"]}


def data_parallel(eng) -> dict:
    ids = [random.Random(21).randrange(3, 2000) for _ in range(500)]
    for _ in range(2):  # round robin: the prompt is cached on both ranks
        eng.generate(input_ids=ids, sampling_params=SAMPLING)
    endpoints = [r["rpc_endpoint"] for r in _ranks(eng)]
    freed = eng.evict_span(ids, 100, 150)
    before = sum(r["cache"]["stats"]["hole_requests"] for r in _ranks(eng))
    runs = [_gen(eng, ids) for _ in range(2)]
    try:
        eng.evict_span([1, 2, 3, 4], 0, 2)
        refusal = None
    except ValueError as e:
        refusal = str(e)
    hole_requests = sum(r["cache"]["stats"]["hole_requests"] for r in _ranks(eng)) - before
    return {"ids": ids, "endpoints": endpoints, "freed": freed, "runs": runs, "hole_requests": hole_requests,
            "refusal": refusal, "caches": [r["cache"] for r in _ranks(eng)]}


def tensor_parallel(eng) -> dict:
    ids = [random.Random(22).randrange(3, 2000) for _ in range(600)]
    eng.generate(input_ids=ids, sampling_params=SAMPLING)
    freed = [eng.evict_span(ids, 0, 20), eng.evict_span(ids, 300, 330)]
    return {"ids": ids, "freed": freed, "runs": [_gen(eng, ids)], "caches": [r["cache"] for r in _ranks(eng)]}


def main() -> None:
    kind, model = sys.argv[1], sys.argv[2]
    os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per rank
    import sglang_holes
    from sglang_holes.patches.launch.engine import shutdown_all

    size = {"dp_size": 2} if kind == "dp" else {"tp_size": 2}
    eng = sglang_holes.Engine(model_path=model, skip_tokenizer_init=True, log_level="error", random_seed=0,
                              radix_cache_backend="holes", max_total_tokens=4000, **size)
    try:
        result = data_parallel(eng) if kind == "dp" else tensor_parallel(eng)
    finally:
        shutdown_all([eng])
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
