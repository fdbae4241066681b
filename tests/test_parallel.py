"""Data and tensor parallelism on CPU (two ranks each, one core per rank), tiny random Llama."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

SAMPLING = {"max_new_tokens": 3, "temperature": 0.0}
BIND = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}


def _start(engines, tiny_llama: Path, **kw) -> object:
    return engines.start(env=BIND, model_path=str(tiny_llama), skip_tokenizer_init=True, log_level="error",
                         random_seed=0, radix_cache_backend="holes", max_total_tokens=4000, **kw)


def _ranks(eng) -> list[dict]:
    return [s["sglang_holes"] for s in eng.get_server_info()["internal_states"]]


def _check(eng) -> None:
    for r in _ranks(eng):
        c = r["cache"]
        assert c["integrity"] == "ok" and c["available"] + c["evictable"] + c["protected"] == c["pool_size"], c


@pytest.fixture(scope="module")
def dp2(engines, tiny_llama):
    return _start(engines, tiny_llama, dp_size=2)


@pytest.fixture(scope="module")
def tp2(engines, tiny_llama):
    return _start(engines, tiny_llama, tp_size=2)


def test_data_parallel_eviction_reaches_every_rank(dp2, tiny_engines):
    """Each rank has its own cache and RPC endpoint: /get_server_info lists both, an eviction
    frees the span on every rank holding the prompt and answers with the total."""
    _, cold = tiny_engines
    rng = random.Random(21)
    ids = [rng.randrange(3, 2000) for _ in range(500)]
    assert dp2.flush_cache().success
    for _ in range(2):  # round robin: the prompt is cached on both ranks
        dp2.generate(input_ids=ids, sampling_params=SAMPLING)
    ranks = _ranks(dp2)
    assert len(ranks) == 2 and len({r["rpc_endpoint"] for r in ranks}) == 2
    assert dp2.evict_span(ids, 100, 150) == 2 * 50
    before = sum(r["cache"]["stats"]["hole_requests"] for r in _ranks(dp2))
    kw = dict(input_ids=ids, sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5)
    ref = cold.generate(**kw)
    for _ in range(2):
        got = dp2.generate(**kw)
        assert got["output_ids"] == ref["output_ids"]
        assert got["meta_info"]["hole_spans"] == [[100, 150], [499, 500]]
    assert sum(r["cache"]["stats"]["hole_requests"] for r in _ranks(dp2)) == before + 2
    with pytest.raises(ValueError, match="not in the cache"):
        dp2.evict_span([1, 2, 3, 4], 0, 2)
    _check(dp2)


def test_tensor_parallel_fills_holes_exactly(tp2, tiny_engines):
    _, cold = tiny_engines
    rng = random.Random(22)
    ids = [rng.randrange(3, 2000) for _ in range(600)]
    assert tp2.flush_cache().success
    tp2.generate(input_ids=ids, sampling_params=SAMPLING)
    assert tp2.evict_span(ids, 0, 20) == 20 and tp2.evict_span(ids, 300, 330) == 30
    kw = dict(input_ids=ids, sampling_params=SAMPLING, return_logprob=True, top_logprobs_num=5)
    got, ref = tp2.generate(**kw), cold.generate(**kw)
    assert got["output_ids"] == ref["output_ids"]
    diff = max(abs(a[0] - b[0]) for x, y in zip(got["meta_info"]["output_top_logprobs"],
                                                 ref["meta_info"]["output_top_logprobs"], strict=True)
               for a, b in zip(x, y, strict=True))
    assert diff <= 1e-4  # fp32; the two ranks' partial sums add in another order
    assert got["meta_info"]["hole_spans"] == [[0, 20], [300, 330], [599, 600]]
    _check(tp2)


def test_http_eviction_with_data_parallelism(tiny_llama, tiny_engines):
    """``sglang-holes serve --dp-size 2``: POST /holes/evict answers with the total freed on both
    ranks (it used to hang: SGLang's RPC endpoint reaches no rank under DP)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import requests

    from tests.test_server import _free_port

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sglang_holes.patches.cli", "serve", "--port", str(port), "--dp-size", "2",
         "--model-path", str(tiny_llama), "--skip-tokenizer-init", "--max-total-tokens", "4000", "--log-level",
         "error"], env=dict(os.environ, **BIND), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        else:
            pytest.fail("server did not become healthy in 300 s")
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
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
