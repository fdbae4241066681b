"""A real ``sglang-holes serve`` for load tests: a small chat model, chunked prefill, a small pool.

The model is a random-weight Llama (4 layers, hidden 128) with the embedded SmolLM2's
tokenizer and chat template, so the real HTTP server serves ``/generate``, ``/holes/evict``
and ``/v1/chat/completions`` (content parts with ``chunk_reuse``) fast enough to load with
hundreds of requests on 2 CPU cores. ``initializer_range=0.2`` makes its logits peaked: greedy
choices are separated by far more than float32 noise, so comparing answers is decisive.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

VOCAB = 49152  # SmolLM2's tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_chat_model(path: Path, tokenizer_dir: Path) -> Path:
    """A random tiny Llama saved at ``path`` with the tokenizer files of ``tokenizer_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                      initializer_range=0.2, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


@dataclass
class LiveServer:
    proc: subprocess.Popen
    base: str
    log: Path
    pool: int

    def post(self, route: str, body: object, timeout: float = 120) -> requests.Response:
        return requests.post(f"{self.base}{route}", json=body, timeout=timeout)

    def cache(self) -> dict:
        info = requests.get(f"{self.base}/get_server_info", timeout=30).json()
        return info["internal_states"][0]["sglang_holes"]["cache"]

    def flush(self) -> None:
        r = requests.post(f"{self.base}/flush_cache", timeout=60)
        assert r.status_code == 200, r.text

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def start_server(model: Path, log: Path, *flags: str, pool: int, env: dict[str, str] | None = None,
                 timeout_s: float = 300) -> LiveServer:
    """``sglang-holes serve`` on a free loopback port, live integrity on; waits for /health."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", SGLANG_HOLES_CHECK_INTEGRITY="1", **(env or {}))
    out = log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "sglang_holes.patches.launch.cli", "serve",
                             "--model-path", str(model),
                             "--host", "127.0.0.1", "--port", str(port), "--max-total-tokens", str(pool),
                             "--random-seed", "0", *flags],
                            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = LiveServer(proc, f"http://127.0.0.1:{port}", log, pool)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited at start:\n{server.tail()}")
        try:
            if requests.get(f"{server.base}/health", timeout=2).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(1)
    server.stop()
    raise RuntimeError(f"server not healthy in {timeout_s:.0f} s:\n{server.tail()}")
