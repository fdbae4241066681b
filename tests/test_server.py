"""The HTTP server, started exactly as `make serve` starts it, and its bad-input paths."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from sglang_holes.config import SINK_TOKENS
from tests.conftest import REPO

CLI = [sys.executable, "-m", "sglang_holes.patches.launch.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, base: str, timeout_s: float = 300) -> None:
    """Wait until the server at ``base`` answers /health (fail if it exits or takes longer)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not up yet, or too busy starting to answer
            pass
        time.sleep(1)
    pytest.fail(f"server did not become healthy in {timeout_s:.0f} s")


def _session_procs(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    return out


@pytest.mark.engine
def test_make_serve_answers_and_shuts_down_cleanly(embedded_model: Path, tokenizer):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "serve", f"PORT={port}", "ARGS=--enable-metrics"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own session: we can find every process it started
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base)
        r = requests.post(f"{base}/generate", json={
            "text": "The capital of France is", "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["text"]
        assert r.json()["meta_info"]["prompt_tokens"] > 0
        r = requests.post(f"{base}/v1/chat/completions", json={
            "model": "default", "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
        assert r.json()["usage"]["completion_tokens"] > 0
        info = requests.get(f"{base}/get_server_info", timeout=10).json()
        assert info["internal_states"][0]["sglang_holes"]["pid"] != proc.pid
        _check_holes_over_http(base, tokenizer)
        _check_chunks_over_http(base, tokenizer)
        _check_chunks_over_openai_chat(base, tokenizer)
    finally:
        sid = proc.pid
        os.killpg(sid, signal.SIGINT)  # what Ctrl-C in the terminal of `make serve` sends
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(sid, signal.SIGKILL)
            pytest.fail("make serve did not exit within 60 s of SIGINT")
        deadline = time.time() + 30
        while _session_procs(sid) and time.time() < deadline:
            time.sleep(0.5)
        left = _session_procs(sid)
        for p in left:
            p.kill()
    assert not left, f"orphan processes after shutdown: {[p.cmdline() for p in left]}"
    # The port is free again (nothing listens; TIME_WAIT connections may remain).
    from sglang_holes.patches.launch.cli import check_port_free

    check_port_free("127.0.0.1", port)


def _check_holes_over_http(base: str, tokenizer) -> None:
    """POST /holes/evict, the hole fields of /generate's meta_info, bad input, Prometheus counters."""
    text = " ".join(f"Line {i}: the {i}th parcel weighs {7 * i % 23} kilograms." for i in range(30))
    ids = tokenizer(text)["input_ids"][:200]
    sampling = {"max_new_tokens": 4, "temperature": 0}
    first = requests.post(f"{base}/generate", json={"input_ids": ids, "sampling_params": sampling}).json()
    r = requests.post(f"{base}/holes/evict", json={"input_ids": ids, "start": 50, "end": 80})
    assert r.status_code == 200 and r.json() == {"freed_tokens": 30}, r.text
    out = requests.post(f"{base}/generate", json={"input_ids": ids, "sampling_params": sampling}).json()
    meta = out["meta_info"]
    assert out["output_ids"] == first["output_ids"]
    assert meta["hole_spans"] == [[50, 80], [199, 200]], meta
    assert (meta["recomputed_tokens"], meta["cached_tokens"]) == (31, 169), meta

    def cache() -> dict:
        return requests.get(f"{base}/get_server_info", timeout=10).json()["internal_states"][0]["sglang_holes"]["cache"]

    before = cache()
    for body, msg in [({"input_ids": ids, "start": 80, "end": 50}, "empty, reversed"),
                      ({"input_ids": ids, "start": 0, "end": 999}, "outside"),
                      ({"input_ids": [*ids[:20], 1, 2, 3], "start": 0, "end": 23}, "not in the cache"),
                      ({"input_ids": ids, "start": "0", "end": 5}, "must be an integer"),
                      ({"input_ids": "hello", "start": 0, "end": 5}, "list of token ids"),
                      ({"input_ids": ids, "start": 0, "end": 5, "stop": 1}, "unknown fields"),
                      ({"input_ids": ids, "start": 0, "end": 5, "cache_salt": "nobody"}, "not in the cache"),
                      ({"input_ids": ids, "start": 0, "end": 5, "extra_key": 3}, "extra_key must be a string"),
                      ([1, 2], "JSON object")]:
        r = requests.post(f"{base}/holes/evict", json=body)
        assert r.status_code == 400 and msg in r.json()["error"], (body, r.text)
    r = requests.post(f"{base}/holes/evict", data="{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    after = cache()
    assert after["integrity"] == "ok"
    assert (after["available"], after["evictable"]) == (before["available"], before["evictable"])
    again = requests.post(f"{base}/generate", json={"input_ids": ids, "sampling_params": sampling}).json()
    assert again["meta_info"]["cached_tokens"] == 199  # still serving, cache intact

    metrics = requests.get(f"{base}/metrics", timeout=10).text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("sglang_holes:")}
    assert values["sglang_holes:hole_requests_total"] >= 1, metrics
    assert values["sglang_holes:hole_spans_filled_total"] >= 1
    assert values["sglang_holes:recomputed_tokens_total"] >= 31
    assert values["sglang_holes:reused_tokens_total"] >= 169


def _run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})))


def test_serve_refuses_busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.time()
        r = _run_cli("serve", "--port", str(port))
    assert r.returncode == 2, r.stderr
    assert "already in use" in r.stderr and str(port) in r.stderr
    assert time.time() - t0 < 60  # refused before any model is loaded


def test_serve_refuses_mixed_chunk_with_the_holes_cache():
    r = _run_cli("serve", "--port", "0", "--enable-mixed-chunk")
    assert r.returncode == 2, r.stderr
    assert "does not support --enable-mixed-chunk" in r.stderr


def test_serve_refuses_missing_model_folder(tmp_path):
    r = _run_cli("serve", "--port", "0", "--model-path", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert "does not exist" in r.stderr


def test_serve_refuses_non_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    r = _run_cli("serve", "--port", "0", "--model-path", str(tmp_path))
    assert r.returncode == 2
    assert "no config.json" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written there


def _check_chunks_over_http(base: str, tokenizer) -> None:
    """A RAG prompt as chunks through /generate's kv_hints: stored, then reused moved; bad hints get 400."""
    from sglang_holes.chunks.hints import build_chunked_prompt

    docs = [f"Report {i}: " + " ".join(f"station {i}-{j} measured {(i * 31 + j * 7) % 40} mm of rain."
                                       for j in range(10)) + "\n" for i in range(3)]

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    sampling = {"max_new_tokens": 4, "temperature": 0}
    first = build_chunked_prompt([*docs, "Question: where did it rain most?"], encode, policy="first_k", k=4)
    r = requests.post(f"{base}/generate", json={"input_ids": first.input_ids, "kv_hints": first.kv_hints,
                                                "sampling_params": sampling})
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["chunk_reuse"]["reused_chunks"] == 0
    moved = build_chunked_prompt([docs[2], docs[0], docs[1], "Question: where was it dry?"], encode,
                                 policy="first_k", k=4)
    r = requests.post(f"{base}/generate", json={"input_ids": moved.input_ids, "kv_hints": moved.kv_hints,
                                                "sampling_params": sampling})
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    sink = max(0, SINK_TOKENS - 4)  # the moved first document's attention sink beyond its k=4 first tokens
    reused_docs = sum(e - s for s, e in moved.chunks[:3]) - 3 * 4 - sink
    assert meta["chunk_reuse"] == {"policy": "first_k", "k": 4, "chunks": 4, "reused_chunks": 3,
                                   "reused_tokens": reused_docs, "sink_recomputed": sink}, meta
    assert meta["cached_tokens"] == reused_docs
    bad = dict(moved.kv_hints, actions=[dict(moved.kv_hints["actions"][0], payload={"chunks": [[0, 10**6]]})])
    for hints, msg in [(bad, "out of range"), ({"actions": 3}, "expected a sequence")]:
        r = requests.post(f"{base}/generate", json={"input_ids": moved.input_ids, "kv_hints": hints,
                                                    "sampling_params": sampling})
        assert r.status_code == 400 and msg in r.text, r.text
    r = requests.post(f"{base}/generate", json={"input_ids": moved.input_ids, "kv_hints": moved.kv_hints,
                                                "sampling_params": sampling})
    assert r.status_code == 200 and r.json()["meta_info"]["chunk_reuse"]["reused_chunks"] == 4, r.text
    metrics = requests.get(f"{base}/metrics", timeout=10).text
    assert any(line.startswith("sglang_holes:chunk_requests_total") and float(line.rsplit(" ", 1)[1]) >= 2
               for line in metrics.splitlines()), metrics


def _check_chunks_over_openai_chat(base: str, tokenizer) -> None:
    """A RAG flow through the real ``openai`` client: documents as content parts, ``chunk_reuse`` in the
    body; the second question (documents in another order) reuses them, reported in OpenAI's usage
    field, and equals the kv_hints path on the same tokens; malformed settings get 400."""
    import openai

    from sglang_holes.chunks.chat import chat_chunked_prompt

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    docs = [f"Ledger {i}: " + " ".join(f"crate {i}-{j} holds {(i * 13 + j * 5) % 50} apples." for j in range(8))
            for i in range(3)]
    questions = ["Question: which crate holds the most apples?", "Question: which crate is empty?"]

    def messages(order: list[int], question: str) -> list[dict]:
        parts = [{"type": "text", "text": docs[i]} for i in order] + [{"type": "text", "text": question}]
        return [{"role": "system", "content": "Answer from the ledgers."}, {"role": "user", "content": parts}]

    reuse = {"policy": "first_k", "k": 4}
    flow = [([0, 1, 2], questions[0]), ([2, 0, 1], questions[1])]
    chat = [client.chat.completions.create(model="default", messages=messages(o, q), temperature=0, max_tokens=8,
                                           extra_body={"chunk_reuse": reuse}).model_dump() for o, q in flow]
    first = chat[0]["metadata"]["chunk_reuse"]
    assert first["reused_chunks"] == 0 and first["reused_tokens"] == 0, first
    # only the chat head an earlier exact request left in the exact tree (e.g. "<|im_start|>system\n")
    assert chat[0]["usage"]["prompt_tokens_details"]["cached_tokens"] == first.get("prefix_tokens", 0)
    second = chat[1]["metadata"]["chunk_reuse"]
    assert second["policy"] == "first_k" and second["chunks"] == 4 and second["reused_chunks"] == 3, second
    # the chat template's head (system prompt, user turn start) is exact KV, shared through the exact tree
    assert second["prefix_tokens"] > 0 and second["reused_tokens"] > 0, second
    cached = chat[1]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == second["prefix_tokens"] + second["reused_tokens"]
    assert cached + second["recomputed_tokens"] == chat[1]["usage"]["prompt_tokens"]

    # The same two requests through /generate's kv_hints, on the same tokens, from an empty cache.
    def render(msgs: list[dict]) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    assert requests.post(f"{base}/flush_cache", timeout=30).status_code == 200
    for (order, q), got in zip(flow, chat, strict=True):
        p = chat_chunked_prompt(messages(order, q), render, encode, reuse)
        ref = requests.post(f"{base}/generate", json={"input_ids": p.input_ids, "kv_hints": p.kv_hints,
                                                      "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
        assert ref.status_code == 200, ref.text
        meta = ref.json()["meta_info"]
        assert meta["prompt_tokens"] == got["usage"]["prompt_tokens"]
        # the same chunk reuse (the exact-tree prefix may differ: the cache was flushed in between)
        mine, theirs = meta["chunk_reuse"], got["metadata"]["chunk_reuse"]
        assert (mine["reused_chunks"], mine["reused_tokens"]) == (theirs["reused_chunks"], theirs["reused_tokens"])
        assert meta["cached_tokens"] - mine.get("prefix_tokens", 0) == \
            got["usage"]["prompt_tokens_details"]["cached_tokens"] - theirs.get("prefix_tokens", 0)
        assert ref.json()["text"] == got["choices"][0]["message"]["content"]

    for bad, msg in [({"policy": "query", "ratio": 3}, "ratio must be"), ({"polcy": "none"}, "unknown fields"),
                     ("none", "must be an object")]:
        with pytest.raises(openai.BadRequestError, match=msg):
            client.chat.completions.create(model="default", messages=messages([0], questions[0]), max_tokens=2,
                                           extra_body={"chunk_reuse": bad})
    with pytest.raises(openai.BadRequestError, match="content as a list"):
        client.chat.completions.create(model="default", max_tokens=2, extra_body={"chunk_reuse": reuse},
                                       messages=[{"role": "user", "content": "no parts"}])
