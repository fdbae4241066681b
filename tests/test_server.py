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

from tests.conftest import REPO

CLI = [sys.executable, "-m", "sglang_holes.patches.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def test_make_serve_answers_and_shuts_down_cleanly(embedded_model: Path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "serve", f"PORT={port}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own session: we can find every process it started
    )
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
    from sglang_holes.patches.cli import check_port_free

    check_port_free("127.0.0.1", port)


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
