"""``sglang_holes.Engine``: a drop-in ``sglang.Engine`` with sglang-holes loaded.

Differences from ``sglang.Engine``, each yielding to an explicit argument:
* the SGLang version is checked first (another release is refused);
* ``model_path`` defaults to the embedded SmolLM2-135M-Instruct (prepared on first use);
  a given local folder is validated before SGLang sees it;
* without a GPU, the plain-CPU defaults of ``patches/launch.py`` apply;
* ``radix_cache_backend`` defaults to ``holes`` (pass ``None`` for SGLang's own cache);
* ``evict_span(input_ids, start, end)`` drops the KV of a span of a cached prompt.

As with ``sglang.Engine``, ``shutdown()`` ends every SGLang subprocess of the calling
process (SGLang kills the whole child tree), other engines of that process included:
shut several engines down together with ``shutdown_all``.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.entrypoints.engine import Engine as SGLangEngine

from sglang_holes.model import resolve_model_path
from sglang_holes.patches.launch import apply_engine_defaults
from sglang_holes.patches.radix_cache import BACKEND_NAME
from sglang_holes.patches.rpc import call_evict_span, evict_span_params
from sglang_holes.patches.version import check_sglang_version


class Engine(SGLangEngine):
    """``sglang.Engine`` with the sglang-holes defaults (see module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        check_sglang_version()
        if "server_args" not in kwargs:
            kwargs["model_path"] = resolve_model_path(kwargs.get("model_path"))
            kwargs.setdefault("radix_cache_backend", BACKEND_NAME)  # None selects SGLang's own cache
            kwargs = apply_engine_defaults(kwargs)
        super().__init__(**kwargs)

    def evict_span(self, input_ids: list[int], start: int, end: int) -> int:
        """Drop the KV of positions ``[start, end)`` of a cached prompt (half-open, token positions).

        For external KV managers and tests. Returns how many tokens were freed (0 if the
        span was already a hole). Raises ``ValueError`` for a prompt not in the cache, an
        empty, reversed or out-of-range span, or KV locked by a running request; the
        cache is then unchanged and the engine keeps serving.
        """
        return call_evict_span(self.send_to_rpc, evict_span_params(input_ids, start, end))


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
