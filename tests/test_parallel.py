"""Data and tensor parallelism on CPU (two ranks each, one core per rank), tiny random Llama."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

SAMPLING = {"max_new_tokens": 3, "temperature": 0.0}
BIND = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}


def _child(kind: str, model: Path) -> dict:
    """Run ``tests/parallel_child.py`` (an engine of two ranks, gone when it returns)."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    r = subprocess.run([sys.executable, "-m", "tests.parallel_child", kind, str(model)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _same_as_cold(run: dict, cold, ids: list[int]) -> None:
    ref = cold.generate(input_ids=ids, sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5)
    assert run["output_ids"] == ref["output_ids"]
    diff = max(abs(a[0] - b[0]) for x, y in zip(run["top"], ref["meta_info"]["output_top_logprobs"], strict=True)
               for a, b in zip(x, y, strict=True))
    assert diff <= 1e-4  # fp32; tensor-parallel partial sums add in another order


def _check(caches: list[dict]) -> None:
    for c in caches:
        assert c["integrity"] == "ok" and c["available"] + c["evictable"] + c["protected"] == c["pool_size"], c


def test_data_parallel_eviction_reaches_every_rank(tiny_llama, tiny_engines):
    """Each rank has its own cache and RPC endpoint: /get_server_info lists both, an eviction
    frees the span on every rank holding the prompt and answers with the total."""
    r = _child("dp", tiny_llama)
    assert len(r["endpoints"]) == 2 and len(set(r["endpoints"])) == 2
    assert r["freed"] == 2 * 50  # the prompt was cached on both ranks
    for run in r["runs"]:  # one request per rank, each refilling its hole
        _same_as_cold(run, tiny_engines[1], r["ids"])
        assert run["hole_spans"] == [[100, 150], [499, 500]]
    assert r["hole_requests"] == 2
    assert "not in the cache" in r["refusal"]
    _check(r["caches"])


def test_tensor_parallel_fills_holes_exactly(tiny_llama, tiny_engines):
    r = _child("tp", tiny_llama)
    assert r["freed"] == [20, 30]
    _same_as_cold(r["runs"][0], tiny_engines[1], r["ids"])
    assert r["runs"][0]["hole_spans"] == [[0, 20], [300, 330], [599, 600]]
    _check(r["caches"])


def test_http_eviction_with_data_parallelism(tiny_llama, tiny_engines):
    """``sglang-holes serve --dp-size 2``: POST /holes/evict answers with the total freed on both
    ranks (it used to hang: SGLang's RPC endpoint reaches no rank under DP)."""
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
    try:
        wait_healthy(proc, base)
        rng = random.Random(23)
        ids = [rng.randrange(3, 2000) for _ in range(400)]
        for _ in range(2):
            r = requests.post(f"{base}/generate", json={"input_ids": ids, "sampling_params": SAMPLING}, timeout=60)
            assert r.status_code == 200, r.text
        r = requests.post(f"{base}/holes/evict", json={"input_ids": ids, "start": 10, "end": 40}, timeout=60)
        assert r.status_code == 200 and r.json() == {"freed_tokens": 60}, r.text
        r = requests.post(f"{base}/holes/evict", json={"input_ids": [5, 6, 7], "start": 0, "end": 1}, timeout=60)
        assert r.status_code == 400 and "not in the cache" in r.json()["error"], r.text
        r = requests.post(f"{base}/generate", json={"input_ids": ids, "sampling_params": SAMPLING}, timeout=60)
        assert r.json()["meta_info"]["hole_spans"] == [[10, 40], [399, 400]]
        ref = tiny_engines[1].generate(input_ids=ids, sampling_params=SAMPLING)
        assert r.json()["output_ids"] == ref["output_ids"]
        states = requests.get(f"{base}/get_server_info", timeout=30).json()["internal_states"]
        assert len(states) == 2 and all(s["sglang_holes"]["cache"]["integrity"] == "ok" for s in states)
        # /metrics sums both ranks' counters (SGLang's multiprocess collector): equal to the ranks' stats
        metrics = requests.get(f"{base}/metrics", timeout=30).text
        values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("sglang_holes:") and "{" in line}
        for key in ("hole_requests", "reused_tokens", "recomputed_tokens"):
            ranks = sum(s["sglang_holes"]["cache"]["stats"][key] for s in states)
            assert values[f"sglang_holes:{key}_total"] == ranks, (key, values)
        assert values["sglang_holes:hole_requests_total"] == 1 and values["sglang_holes:reused_tokens_total"] == 369
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
