"""Data and tensor parallelism on CPU (two ranks each, one core per rank), tiny random Llama."""

from __future__ import annotations

import random

import pytest

pytestmark = pytest.mark.engine

SAMPLING = {"max_new_tokens": 3, "temperature": 0.0}
BIND = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}


def _same_as_cold(run: dict, cold, ids: list[int]) -> None:
    ref = cold.generate(input_ids=ids, sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5)
    assert run["output_ids"] == ref["output_ids"]
    diff = max(abs(a[0] - b[0]) for x, y in zip(run["top"], ref["meta_info"]["output_top_logprobs"], strict=True)
               for a, b in zip(x, y, strict=True))
    assert diff <= 1e-4  # fp32; tensor-parallel partial sums add in another order


def _check(caches: list[dict]) -> None:
    for c in caches:
        assert c["integrity"] == "ok" and c["available"] + c["evictable"] + c["protected"] == c["pool_size"], c


def test_tensor_parallel_fills_holes_exactly(tiny_llama, tiny_engines, engines):
    """Two tensor-parallel ranks, one core each: holes punched on both ranks' caches are refilled
    exactly (fp32: the ranks' partial sums add in another order than one rank's)."""
    ids = [random.Random(22).randrange(3, 2000) for _ in range(600)]
    with engines.scoped(BIND, model_path=str(tiny_llama), skip_tokenizer_init=True, log_level="error",
                        random_seed=0, radix_cache_backend="holes", max_total_tokens=4000, tp_size=2) as eng:
        eng.generate(input_ids=ids, sampling_params=SAMPLING)
        assert [eng.evict_span(ids, 0, 20), eng.evict_span(ids, 300, 330)] == [20, 30]
        out = eng.generate(input_ids=ids, sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5)
        assert out["meta_info"]["hole_spans"] == [[0, 20], [300, 330], [599, 600]]
        _same_as_cold({"output_ids": out["output_ids"], "top": out["meta_info"]["output_top_logprobs"]},
                      tiny_engines[1], ids)
        _check([s["sglang_holes"]["cache"] for s in eng.get_server_info()["internal_states"]])


def test_data_parallel_engine_evicts_on_every_rank(tiny_llama, tiny_engines, engines):
    """``Engine.evict_span`` under DP: it finds every rank's endpoint through ``get_server_info`` and
    answers with the total freed; a prompt no rank holds is refused with ``ValueError``."""
    ids = [random.Random(21).randrange(3, 2000) for _ in range(500)]
    with engines.scoped(BIND, model_path=str(tiny_llama), skip_tokenizer_init=True, log_level="error",
                        random_seed=0, radix_cache_backend="holes", max_total_tokens=4000, dp_size=2) as eng:
        for _ in range(2):  # round robin: the prompt is cached on both ranks
            eng.generate(input_ids=ids, sampling_params=SAMPLING)
        assert eng.evict_span(ids, 100, 150) == 2 * 50
        with pytest.raises(ValueError, match="not in the cache"):
            eng.evict_span([1, 2, 3, 4], 0, 2)
        out = eng.generate(input_ids=ids, sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5)
        assert out["meta_info"]["hole_spans"] == [[100, 150], [499, 500]]
        _same_as_cold({"output_ids": out["output_ids"], "top": out["meta_info"]["output_top_logprobs"]},
                      tiny_engines[1], ids)
        _check([s["sglang_holes"]["cache"] for s in eng.get_server_info()["internal_states"]])


def test_data_parallel_server(tiny_llama, tiny_engines):
    """``sglang-holes serve --dp-size 2``: each rank has its own cache and RPC endpoint (/get_server_info
    lists both), POST /holes/evict frees the span on every rank holding the prompt and answers with the
    total (it used to hang: SGLang's RPC endpoint reaches no rank under DP), each rank's hole request
    equals a cold run, and /metrics sums the ranks' counters."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys

    import requests

    from tests.test_server import _free_port, wait_healthy

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sglang_holes.patches.launch.cli", "serve", "--port", str(port), "--dp-size", "2",
         "--model-path", str(tiny_llama), "--skip-tokenizer-init", "--max-total-tokens", "4000", "--log-level",
         "error", "--enable-metrics"], env=dict(os.environ, **BIND), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def states() -> list[dict]:
        info = requests.get(f"{base}/get_server_info", timeout=30).json()
        return [s["sglang_holes"] for s in info["internal_states"]]

    try:
        wait_healthy(proc, base)
        rng = random.Random(23)
        ids = [rng.randrange(3, 2000) for _ in range(400)]
        for _ in range(2):  # round robin: the prompt is cached on both ranks
            r = requests.post(f"{base}/generate", json={"input_ids": ids, "sampling_params": SAMPLING}, timeout=60)
            assert r.status_code == 200, r.text
        endpoints = [s["rpc_endpoint"] for s in states()]
        assert len(endpoints) == 2 and len(set(endpoints)) == 2
        r = requests.post(f"{base}/holes/evict", json={"input_ids": ids, "start": 10, "end": 40}, timeout=60)
        assert r.status_code == 200 and r.json() == {"freed_tokens": 60}, r.text  # 30 on each rank
        r = requests.post(f"{base}/holes/evict", json={"input_ids": [5, 6, 7], "start": 0, "end": 1}, timeout=60)
        assert r.status_code == 400 and "not in the cache" in r.json()["error"], r.text
        for _ in range(2):  # one request per rank, each refilling its own hole
            r = requests.post(f"{base}/generate", json={"input_ids": ids, "sampling_params": SAMPLING,
                                                        "return_logprob": True, "top_logprobs_num": 5}, timeout=60)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["meta_info"]["hole_spans"] == [[10, 40], [399, 400]]
            _same_as_cold({"output_ids": out["output_ids"], "top": out["meta_info"]["output_top_logprobs"]},
                          tiny_engines[1], ids)
        ranks = states()
        assert [s["cache"]["stats"]["hole_requests"] for s in ranks] == [1, 1]
        _check([s["cache"] for s in ranks])
        # /metrics sums both ranks' counters (SGLang's multiprocess collector): equal to the ranks' stats
        metrics = requests.get(f"{base}/metrics", timeout=30).text
        values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("sglang_holes:") and "{" in line}
        for key in ("hole_requests", "reused_tokens", "recomputed_tokens"):
            assert values[f"sglang_holes:{key}_total"] == sum(s["cache"]["stats"][key] for s in ranks), (key, values)
        assert values["sglang_holes:hole_requests_total"] == 2 and values["sglang_holes:reused_tokens_total"] == 2 * 369
    finally:
        with contextlib.suppress(ProcessLookupError):  # a server that died: the failure above is the news
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
