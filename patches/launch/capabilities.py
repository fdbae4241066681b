"""What a ``holes`` server can do: ONE decision, computed once per process at start.

Two processes need it: the tokenizer manager, which validates each request at entry
(``patches/serving/entry.py``: RAG document hints that cannot be served get HTTP 400 with
the reason), and the scheduler, whose cache factory (``patches/scheduler/cache_factory.py``)
builds hole batches, document reuse and the scored policies' probe only where they can run.
Both call ``decide`` on what each has at start (SGLang's resolved ``ServerArgs`` and the
``ModelConfig``), so they cannot disagree. The one fact only the scheduler sees, the loaded
model's sliding window (``ModelRunner.sliding_window_size``), must agree with the decision,
or the server refuses to start (``check_runner``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sglang_holes.chunks.llama_stack import check_supported
from sglang_holes.chunks.rope import RopeSpec, UnsupportedRopeError
from sglang_holes.patches.launch.hooks import BACKEND_NAME

HOLE_BACKENDS = ("torch_native", "flashinfer", "fa3")  # attention backends with a hole-aware subclass
_UNQUANTIZED_KV = ("auto", "bfloat16", "bf16", "float16", "fp16", "float32")


@dataclass(frozen=True)
class Capabilities:
    """Each ``no_*`` field is why the server cannot do that (None: it can).

    no_holes_cache: it does not run the ``holes`` radix cache with the radix cache on.
    no_hole_batches: hole batches cannot run (model or attention backend); requests with KV
        beyond a hole then take SGLang's stock path (recompute from the first hole; correct).
    no_chunk_reuse: RAG document hints (``sglang_holes.chunks``) cannot be served: HTTP 400.
    no_probe: the ``deviation`` and ``query`` policies' probe cannot run: HTTP 400 for them.
    prefill_backend: the attention backend that runs extends. window: the model's sliding window
    (tokens; None without one). num_layers: the model's layers (0: unknown).
    """

    no_holes_cache: str | None
    no_hole_batches: str | None
    no_chunk_reuse: str | None
    no_probe: str | None
    prefill_backend: str | None
    window: int | None
    num_layers: int

    @property
    def hole_batches(self) -> bool:
        return self.no_hole_batches is None

    @property
    def chunk_reuse(self) -> bool:
        return self.no_chunk_reuse is None


def decide(server_args: Any, model_config: Any) -> Capabilities:
    """The capabilities of a server with these (resolved) settings serving this model.

    A server without the ``holes`` cache gets every ``no_*`` reason at once, its model unread:
    installing sglang-holes changes nothing for it."""
    prefill = prefill_backend(server_args)
    no_cache = _why_no_holes_cache(server_args)
    if no_cache is not None:
        return Capabilities(no_cache, no_cache, no_cache, no_cache, prefill, None, 0)
    hf = text_config(model_config)
    config = hf.to_dict() if hf is not None else None
    window = model_window(model_config)
    no_batches = _why_no_hole_batches(server_args, model_config, prefill, window)
    no_chunks = no_batches or _why_no_chunk_reuse(server_args, config)
    no_probe = no_chunks or _why_no_probe(server_args, config)
    layers = int((config or {}).get("num_hidden_layers") or 0)
    return Capabilities(no_cache, no_batches, no_chunks, no_probe, prefill, window, layers)


def check_runner(caps: Capabilities, runner: Any) -> None:
    """``ValueError`` (refused at start) if the loaded model has a sliding window the decision missed
    and the prefill backend's hole batches would ignore it."""
    runner_window = getattr(runner, "sliding_window_size", None)
    if caps.hole_batches and caps.prefill_backend == "flashinfer" and runner_window and caps.window is None:
        raise ValueError("FlashInfer hole batches do not support sliding-window attention yet, and this model's "
                         f"window ({runner_window}) is not in its config: serve it with --radix-cache-backend radix "
                         "or another attention backend")


def text_config(model_config: Any) -> Any:
    return getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)


def prefill_backend(server_args: Any) -> str | None:
    """The backend SGLang runs extends with: ``--prefill-attention-backend``, else ``--attention-backend``."""
    return getattr(server_args, "prefill_attention_backend", None) or getattr(server_args, "attention_backend", None)


def model_window(model_config: Any) -> int | None:
    """The model's sliding window or attention chunk (tokens), as SGLang's ``ModelConfig`` reads it."""
    hf = text_config(model_config)
    if hf is not None and getattr(hf, "use_sliding_window", True) is False:  # e.g. Qwen2: a window, unused
        return getattr(model_config, "attention_chunk_size", None)
    window = getattr(model_config, "sliding_window_size", None) or getattr(hf, "sliding_window", None)
    return window or getattr(model_config, "attention_chunk_size", None)


def quantized_kv(server_args: Any) -> str | None:
    """Why stored document KV cannot be re-rotated in this server's KV pool (a quantized dtype), or None."""
    dtype = str(getattr(server_args, "kv_cache_dtype", None) or "auto")
    if dtype in _UNQUANTIZED_KV:
        return None
    return f"a quantized KV cache (--kv-cache-dtype {dtype}) cannot be re-rotated in place"


def _why_no_holes_cache(args: Any) -> str | None:
    if getattr(args, "radix_cache_backend", None) != BACKEND_NAME or getattr(args, "disable_radix_cache", False):
        return f"the server does not run the holes radix cache (--radix-cache-backend {BACKEND_NAME}, radix cache on)"
    return None


def _why_no_hole_batches(args: Any, model: Any, prefill: str | None, window: int | None) -> str | None:
    if getattr(model, "model_is_mrope", False):
        return ("3-D RoPE (mrope) models: SGLang builds mrope positions as the contiguous tail, so a hole's "
                "KV would be computed at the wrong rotation")
    if str(getattr(getattr(model, "attention_arch", None), "name", "")) == "MLA":
        return "MLA models run SGLang's MLA attention backends, which cannot run hole batches"
    if prefill not in HOLE_BACKENDS:
        return f"attention backend {[prefill] if prefill else 'default'} cannot run hole batches (only {HOLE_BACKENDS})"
    if (getattr(args, "attn_cp_size", None) or 1) > 1:
        return "context parallelism splits a prefill by position across ranks; hole batches are not split"
    if prefill == "fa3":
        return _why_not_fa3(args, model)
    if prefill == "flashinfer":
        return _why_not_flashinfer(args, model, window)
    return None


def _why_not_fa3(args: Any, model: Any) -> str | None:
    """What keeps SGLang's FA3 extend from being one kernel call per layer over the batch's runs."""
    if getattr(model, "is_local_attention_model", False):
        return "FA3 hole batches do not support local (chunked) attention models"
    if getattr(model, "is_encoder_decoder", False):
        return "FA3 hole batches do not support encoder-decoder models"
    if str(getattr(args, "kv_cache_dtype", None) or "auto") != "auto":
        return "FA3 hole batches do not support a quantized KV cache (its descales are per sequence)"
    return None


def _why_not_flashinfer(args: Any, model: Any, window: int | None) -> str | None:
    """SGLang's FlashInfer backend needs several wrappers for these; hole batches use one."""
    if window:
        return "FlashInfer hole batches do not support sliding-window attention yet"
    if getattr(model, "is_encoder_decoder", False):
        return "FlashInfer hole batches do not support encoder-decoder models"
    if "fp4" in str(getattr(args, "kv_cache_dtype", "")):
        return "FlashInfer hole batches do not support an FP4 KV cache"
    return None


def _why_no_chunk_reuse(args: Any, config: dict | None) -> str | None:
    """Document reuse copies stored KV per token, re-rotated: a token-granular, unquantized pool and a
    RoPE that re-rotates exactly."""
    if config is None:
        return "the model's Hugging Face config is unavailable"
    if (getattr(args, "page_size", None) or 1) != 1:
        return "chunk reuse needs --page-size 1"
    if (why := quantized_kv(args)) is not None:
        return why
    try:
        RopeSpec.from_config(config)
    except UnsupportedRopeError as e:  # YaRN, dynamic NTK, ...: positions cannot be moved exactly
        return str(e)
    except (KeyError, TypeError, ValueError) as e:
        return f"the model's RoPE cannot be read from its config ({type(e).__name__}: {e})"
    return None


def _why_no_probe(args: Any, config: dict | None) -> str | None:
    try:
        check_supported(config or {}, getattr(args, "tp_size", 1) or 1)
    except ValueError as e:
        return str(e)
    return None
