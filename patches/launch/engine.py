"""``sglang_holes.Engine``: a drop-in ``sglang.Engine`` with sglang-holes loaded.

Differences from ``sglang.Engine``, each yielding to an explicit argument:
* the SGLang version is checked first (another release is refused);
* ``model_path`` defaults to the embedded SmolLM2-135M-Instruct (prepared on first use);
  a given local folder is validated before SGLang sees it;
* the defaults table of ``patches/launch/server_args.py`` applies: ``radix_cache_backend`` ``holes``
  (pass ``None`` for SGLang's own cache), the plain-CPU settings without a GPU;
* every SGLang target of ``patches/launch/hooks.py`` is checked first (a moved one refuses to start);
* ``evict_span(input_ids, start, end)`` drops the KV of a span of a cached prompt;
* ``generate(prompt_chunks=[...], chunk_policy=...)`` sends a RAG prompt as chunks whose
  KV is reused at any position (``patches/scheduler/chunk_reuse.py``).

As with ``sglang.Engine``, ``shutdown()`` ends every SGLang subprocess of the calling
process (SGLang kills the whole child tree), other engines of that process included:
shut several engines down together with ``shutdown_all``, or one alone with ``shutdown_one``.
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.entrypoints.engine import Engine as SGLangEngine

from sglang_holes.chunks.hints import ChunkedPrompt, build_chunked_prompt
from sglang_holes.model import resolve_model_path
from sglang_holes.patches.launch.hooks import verify
from sglang_holes.patches.launch.server_args import apply_engine_defaults, refusal
from sglang_holes.patches.launch.version import check_sglang_version
from sglang_holes.patches.serving.rpc import (
    CHUNK_KV,
    RankChannels,
    call_evict_span,
    call_rpc,
    evict_span_params,
    rank_endpoints,
)


class Engine(SGLangEngine):
    """``sglang.Engine`` with the sglang-holes defaults (see module docstring)."""

    _holes_ranks: RankChannels | None = None  # data parallelism: one RPC socket per rank, made on first use

    def __init__(self, **kwargs: Any) -> None:
        check_sglang_version()
        verify()  # every SGLang target the plugin hooks still exists with the expected shape
        if "server_args" not in kwargs:
            if (why := refusal(kwargs)) is not None:  # before any model is resolved or loaded
                raise ValueError(why)
            kwargs["model_path"] = resolve_model_path(kwargs.get("model_path"))
            kwargs = apply_engine_defaults(kwargs)  # radix_cache_backend=None selects SGLang's own cache
        super().__init__(**kwargs)

    def chunked_prompt(self, prompt_chunks: list[str | list[int]], chunk_policy: str = "first_k",
                       **params: Any) -> ChunkedPrompt:
        """``input_ids`` + ``kv_hints`` for a prompt made of chunks (see ``generate``)."""
        tok = self.tokenizer_manager.tokenizer

        def encode(text: str) -> list[int]:
            if tok is None:
                raise ValueError("this engine has no tokenizer (skip_tokenizer_init): pass chunks as token ids")
            return tok(text, add_special_tokens=False)["input_ids"]

        prefix = tok("", add_special_tokens=True)["input_ids"] if tok is not None else []  # BOS: not a chunk
        return build_chunked_prompt(prompt_chunks, encode, prefix, chunk_policy, **params)

    def generate(self, prompt: Any = None, sampling_params: Any = None, input_ids: Any = None, *args: Any,
                 prompt_chunks: list[str | list[int]] | None = None, chunk_policy: str = "first_k",
                 chunk_k: int | None = None, chunk_ratio: float | None = None, chunk_layers: int | None = None,
                 **kwargs: Any) -> Any:
        """``sglang.Engine.generate``, plus chunked RAG prompts.

        ``prompt_chunks``: one request's prompt as a list of chunks (documents, then the
        question), each text or token ids, instead of ``prompt`` / ``input_ids``. Each chunk's
        KV is stored once computed and reused wherever the same chunk appears again (same
        namespace: ``extra_key`` / cache salt), K re-rotated to the new position.
        ``chunk_policy``: ``none`` | ``first_k`` (recompute the first ``chunk_k`` tokens of
        each reused chunk, default 16) | ``deviation`` (recompute the ``chunk_ratio`` fraction,
        default 0.15, of reused tokens whose layer-1 KV deviates most) | ``query`` (the
        ``chunk_ratio`` fraction the request's own computed tokens attend to most through the
        first ``chunk_layers`` layers, default 8); with the last two, ``chunk_k`` (default 0)
        also recomputes each reused chunk's first tokens. Approximate by nature:
        ``meta_info["chunk_reuse"]`` reports what was reused. ``ValueError`` for bad input.
        """
        if prompt_chunks is not None:
            if prompt is not None or input_ids is not None or kwargs.get("kv_hints") is not None:
                raise ValueError("pass prompt_chunks instead of prompt / input_ids / kv_hints, not with them")
            given = (("k", chunk_k), ("ratio", chunk_ratio), ("layers", chunk_layers))
            params = {k: v for k, v in given if v is not None}
            input_ids, kwargs["kv_hints"], _ = self.chunked_prompt(prompt_chunks, chunk_policy, **params)
        return super().generate(prompt, sampling_params, input_ids, *args, **kwargs)

    def evict_span(self, input_ids: list[int], start: int, end: int, extra_key: str | None = None,
                   cache_salt: str | None = None) -> int:
        """Drop the KV of positions ``[start, end)`` of a cached prompt (half-open, token positions).

        For external KV managers and tests. Returns how many tokens were freed (0 if the
        span was already a hole). Raises ``ValueError`` for a prompt not in the cache, an
        empty, reversed or out-of-range span, or KV locked by a running request; the
        cache is then unchanged and the engine keeps serving. ``extra_key`` / ``cache_salt``: the
        namespace the prompt was generated under.
        """
        params = evict_span_params(input_ids, start, end, extra_key, cache_salt)
        if self.server_args.dp_size <= 1:
            return call_evict_span(self.send_to_rpc, params)
        # Data parallelism: every rank has an RPC endpoint of its own (patches/serving/rpc.py).
        if self._holes_ranks is None:
            self._holes_ranks = RankChannels()
        return self._holes_ranks.evict_span(rank_endpoints(self.get_server_info()["internal_states"]), params)

    def chunk_kv(self, tokens: list[int], layer: int = 0, offset: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """K (after RoPE) and V ``[len, kv_heads, head_dim]`` of a stored chunk at ``layer``.

        With ``offset``, the chunk moved to positions ``[offset, offset + len)`` by the same
        re-rotating copy a request placing it there gets. Returns ``(k, v, stored offset)``;
        ``ValueError`` if the chunk is not stored. For inspection and tests.
        """
        r = call_rpc(self.send_to_rpc, CHUNK_KV, {"tokens": [int(t) for t in tokens], "layer": layer,
                                                 "offset": offset})
        return torch.tensor(r["k"]), torch.tensor(r["v"]), int(r["offset"])


def shutdown_one(engine: SGLangEngine) -> None:
    """Shut down one engine of a process that runs several, leaving the others serving.

    Ends only the processes this engine started (its schedulers and detokenizers, each with
    its children), after stopping its watchdog, which would otherwise take a scheduler's
    death for a crash and take the whole process down. Frees the engine's memory where
    ``shutdown()`` could only be called once for all (tests that start many engines).
    """
    from sglang.srt.utils import kill_process_tree

    watchdog = getattr(getattr(engine, "tokenizer_manager", None), "_subprocess_watchdog", None)
    if watchdog is not None:
        watchdog.stop()
    init = getattr(engine, "_scheduler_init_result", None)
    for pid in list(getattr(init, "all_child_pids", None) or []):
        kill_process_tree(pid, include_parent=True, wait_timeout=60)
    if (rpc := getattr(engine, "send_to_rpc", None)) is not None:
        rpc.close(linger=0)
        engine.send_to_rpc = None


def shutdown_all(engines: list[SGLangEngine]) -> None:
    """Shut down several engines of one process.

    ``sglang.Engine.shutdown()`` kills every SGLang subprocess of the process, so the
    first call would kill the others' schedulers while their watchdogs still run, and
    a watchdog that sees its scheduler die sends SIGQUIT to this process (SGLang's
    handler then kills the whole process tree, caller included). Stop every watchdog
    first, then shut each engine down.
    """
    for eng in engines:
        watchdog = getattr(getattr(eng, "tokenizer_manager", None), "_subprocess_watchdog", None)
        if watchdog is not None:
            watchdog.stop()
    for eng in engines:
        eng.shutdown()
