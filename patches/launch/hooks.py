"""Every SGLang touch-point of sglang-holes, in one table.

SGLang's ``HookRegistry`` logs and carries on when a target is missing, so a target
that moved in another SGLang release would silently turn sglang-holes back into stock
SGLang. Instead, ``verify()`` resolves every entry below and checks the parameters each
hook unpacks; ``tests/test_hook_contract.py`` runs it, and ``sglang_holes.Engine`` /
``sglang-holes serve`` run it before starting (a mismatch refuses to start).

* ``HOOKS``: functions wrapped through ``HookRegistry`` (target, kind, our hook, the
  target's leading parameters the hook receives positionally).
* ``REGISTRY_ENTRIES``: SGLang registries we add to or wrap (radix cache, attention backends).
* ``SUBCLASSED``: SGLang classes we subclass and the methods we override or call.
* ``INVARIANTS``: lines of SGLang's scheduler a hole fill relies on (virtual order).
* ``ATTRIBUTES``: fields our hooks read or write on SGLang objects (``Req``,
  ``ScheduleBatch``, ``ForwardBatch``, ...). SGLang objects carry at most one attribute of ours
  each: ``req.holes`` (``RequestHoles``, ``patches/scheduler/request_holes.py``), a ``ScheduleBatch``'s
  ``holes`` (its frozen ``BatchHoles``, written by the extend hook's commit step, read by the
  ``ForwardBatch.init_new`` hook, which hands it to the attention backend) and the tokenizer
  manager's ``holes_capabilities`` (``patches/launch/capabilities.py``, decided at start).

The table is data only: importing it imports nothing from SGLang.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re
from typing import Any, NamedTuple

BACKEND_NAME = "holes"  # --radix-cache-backend holes


class HookSpec(NamedTuple):
    """``kind`` (before | after | around) hook ``hook`` ("package.module:function" in
    ``sglang_holes.patches``) on ``target``, whose first parameters must be ``params``."""

    target: str
    kind: str
    hook: str
    params: tuple[str, ...]


class RegistryEntry(NamedTuple):
    """``registry`` (a dotted path: a dict, or a registering function) and the key we use."""

    registry: str
    key: str


class Subclassed(NamedTuple):
    cls: str
    methods: tuple[str, ...]


class Attributes(NamedTuple):
    cls: str
    names: tuple[str, ...]


_SB = "sglang.srt.managers.schedule_batch"
HOOKS: tuple[HookSpec, ...] = (
    HookSpec(f"{_SB}.ScheduleBatch.prepare_for_extend", "after",
             "scheduler.extend:after_prepare_for_extend", ("self",)),
    HookSpec("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", "after",
             "attention.forward_batch:after_init_new", ("cls", "batch", "model_runner")),
    HookSpec("sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run", "before",
             "scheduler.pool_audit:before_get_next_batch_to_run", ("self", "running_batch", "last_batch")),
    HookSpec("sglang.srt.managers.scheduler.Scheduler.handle_rpc_request", "around",
             "serving.rpc:around_rpc", ("self", "recv_req")),
    HookSpec("sglang.srt.managers.scheduler.Scheduler.init_ipc_channels", "after",
             "serving.rpc:after_init_ipc_channels", ("self", "port_args")),
    HookSpec("sglang.srt.managers.scheduler_components.output_streamer."
             "SchedulerOutputStreamer.is_request_level_customized_info_key", "around",
             "serving.meta_info:around_is_request_level", ("self", "key")),
    HookSpec("sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info", "around",
             "serving.meta_info:around_update_meta", ("self", "meta_info", "state", "customized_info", "index",
                                              "finish_reason")),
    HookSpec("sglang.srt.managers.tokenizer_manager.TokenizerManager.__init__", "after",
             "serving.entry:after_init", ("self", "server_args", "port_args")),
    HookSpec("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request", "after",
             "serving.entry:after_validate", ("self", "obj", "input_ids")),
    HookSpec("sglang.srt.managers.io_struct.GenerateReqInput._normalize_kv_hints", "before",
             "serving.entry:before_normalize_kv_hints", ("self", "num")),
    HookSpec("sglang.srt.entrypoints.http_server._setup_and_run_http_server", "before",
             "serving.http_server:before_setup", ("server_args", "tokenizer_manager", "template_manager", "port_args")),
    HookSpec("sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._convert_to_internal_request", "after",
             "serving.openai_chat:after_convert_to_internal_request", ("self", "request", "raw_request")),
    HookSpec("sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._build_chat_response", "after",
             "serving.openai_chat:after_build_chat_response", ("self", "request", "ret")),
    HookSpec("sglang.srt.managers.scheduler_components.internal_state."
             "SchedulerInternalStateController.get_internal_state", "after",
             "serving.internal_state:after_get_internal_state", ("self",)),
)

_ATTN = "sglang.srt.layers.attention"
REGISTRY_ENTRIES: tuple[RegistryEntry, ...] = (
    RegistryEntry("sglang.srt.mem_cache.registry.register_radix_cache_backend", BACKEND_NAME),
    RegistryEntry("sglang.srt.arg_groups.choices.add_radix_eviction_policy_choices", "cost-aware"),
    RegistryEntry(f"{_ATTN}.attention_registry.ATTENTION_BACKENDS", "torch_native"),
    RegistryEntry(f"{_ATTN}.attention_registry.ATTENTION_BACKENDS", "flashinfer"),
    RegistryEntry(f"{_ATTN}.attention_registry.ATTENTION_BACKENDS", "fa3"),
)

# Modules that load CUDA kernels at import (``sgl_kernel``): ``verify()`` checks their entries where
# CUDA is present; the contract test checks them on CPU through a stand-in ``sgl_kernel``.
CUDA_ONLY = (f"{_ATTN}.flashattention_backend.",)

SUBCLASSED: tuple[Subclassed, ...] = (
    Subclassed("sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache",
               ("reset", "match_prefix", "checkpoint", "evict", "inc_lock_ref", "dec_lock_ref", "lock",
                "unlock", "path_device_indices", "prefix_device_indices", "free_kv_row", "on_release",
                "evictable_size", "protected_size", "total_size")),
    # Called, not subclassed: the live pool audit lists the requests holding a row as SGLang does.
    Subclassed("sglang.srt.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker",
               ("_requests_owning_rows",)),
    Subclassed(f"{_ATTN}.torch_native_backend.TorchNativeAttnBackend",
               ("init_forward_metadata", "forward_extend")),
    Subclassed(f"{_ATTN}.flashinfer_backend.FlashInferAttnBackend",
               ("init_forward_metadata", "forward_extend", "_check_kv_attention_access")),
    Subclassed(f"{_ATTN}.flashattention_backend.FlashAttentionBackend", ("init_forward_metadata", "forward_extend")),
)

ATTRIBUTES: tuple[Attributes, ...] = (
    Attributes("sglang.srt.server_args.ServerArgs", ("radix_eviction_policy", "radix_eviction_policy_config",
                                                     "radix_cache_backend", "enable_mixed_chunk", "dp_size",
                                                     "speculative_algorithm", "cuda_graph_backend_prefill",
                                                     "cuda_graph_config", "enable_mis", "kv_cache_dtype",
                                                     "prefill_attention_backend", "page_size", "tp_size",
                                                     "disable_radix_cache", "attn_cp_size",
                                                     "attention_backend")),
    Attributes(f"{_SB}.Req", (
        "extend_end", "full_untruncated_fill_ids", "multimodal_inputs", "input_embeds", "return_logprob",
        "logprob_start_len", "origin_input_ids", "prefix_len", "cached_tokens", "kv", "customized_info",
        "kv_hints", "extra_key", "cache_salt", "rid", "last_node", "lock", "return_hidden_states", "priority",
        "finished")),
    # The decay duel's shadow caches are the pool's size; /get_server_info reports it.
    Attributes("sglang.srt.mem_cache.allocator.base.BaseTokenToKVPoolAllocator", ("size",)),
    Attributes(f"{_SB}.ReqKvInfo", ("req_pool_idx", "cache_protected_len", "kv_allocated_len", "kv_committed_len",
                                    "cache_inserted_len")),
    Attributes("sglang.srt.managers.scheduler.Scheduler", ("tree_cache", "token_to_kv_pool_allocator",
                                                           "invariant_checker")),
    Attributes(f"{_SB}.ScheduleBatch", (
        "reqs", "tree_cache", "prefix_lens", "extend_lens", "extend_logprob_start_lens", "extend_num_tokens",
        "prefill_input_ids_cpu", "out_cache_loc", "req_to_token_pool", "return_logprob",
        "extend_input_logprob_token_ids", "model_config")),
    Attributes("sglang.srt.model_executor.forward_batch_info.ForwardBatch", (
        "forward_mode", "positions", "seq_lens", "seq_lens_cpu", "extend_seq_lens_cpu", "out_cache_loc")),
    # The ForwardBatch hook hands a batch's BatchHoles to the backend that runs extends.
    Attributes("sglang.srt.model_executor.model_runner.ModelRunner", ("attn_backend", "sliding_window_size")),
    Attributes(f"{_ATTN}.hybrid_attn_backend.HybridAttnBackend", ("prefill_backend",)),
    Attributes("sglang.srt.managers.tokenizer_manager.TokenizerManager", ("server_args", "model_config",
                                                                          "_subprocess_watchdog")),
    # shutdown_one / shutdown_all (patches/launch/engine.py): stop one engine's watchdog and processes.
    Attributes("sglang.srt.entrypoints.engine.Engine", ("tokenizer_manager", "_scheduler_init_result",
                                                        "send_to_rpc")),
    Attributes("sglang.srt.entrypoints.engine.SchedulerInitResult", ("all_child_pids",)),
    Attributes(f"{_ATTN}.flashinfer_backend.FlashInferAttnBackend", (
        "indices_updater_prefill", "prefill_wrappers_paged", "forward_metadata", "num_wrappers",
        "prefill_uses_dequant_workspace", "enable_mis", "req_to_token_pool", "page_size", "prefill_kv_access",
        "decode_kv_access")),
    Attributes(f"{_ATTN}.flashattention_backend.FlashAttentionBackend", (
        "forward_metadata", "req_to_token_pool", "page_size", "use_mla", "local_attn_builder",
        "use_sliding_window_kv_pool", "kv_index_translator", "_kv_shard_pool", "attn_cp_size", "kv_cache_dtype_str",
        "is_encoder_decoder", "fa_impl_ver")),
    Attributes(f"{_ATTN}.flashattention_backend.FlashAttentionMetadata", (
        "page_table", "cu_seqlens_q", "cache_seqlens_int32", "cu_seqlens_k", "max_seq_len_q", "max_seq_len_k",
        "scheduler_metadata")),
)


class Invariant(NamedTuple):
    """SGLang behaviour a hole fill relies on: ``target``'s source contains ``code``, because ``why``."""

    target: str
    code: str
    why: str


# Hole requests are shown to SGLang in virtual order (patches/request_holes.HoleFill): the
# reused tokens as the prefix, then the missing ones. That works because of these lines.
INVARIANTS: tuple[Invariant, ...] = (
    Invariant("sglang.srt.mem_cache.common.match_kv_cache",
              "req.kv.cache_protected_len = match_result.cache_protected_len",
              "match_prefix reports R reused tokens as the prefix but only [0, P0) as tree-owned"),
    Invariant("sglang.srt.mem_cache.allocation._prefix_kv_indices", "batch.tree_cache.prefix_device_indices(req)",
              "a new request's prefix slots come from the cache (the reused spans), a later piece's from its row"),
    Invariant("sglang.srt.mem_cache.allocation._prefix_kv_indices", "row[: req.prefix_len]",
              "a later prefill piece re-reads its own row (rewritten in position order by the extend hook)"),
    Invariant("sglang.srt.managers.scheduler.Scheduler._get_new_batch_prefill_raw",
              "self.chunked_req.init_next_round_input()",
              "a chunked request is not matched again between chunks (its HoleFill carries on)"),
    Invariant("sglang.srt.mem_cache.common.checkpoint_kv_cache", "req.prefix_len = req.extend_end",
              "after each prefill piece the virtual prefix grows by the piece's length"),
    Invariant("sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend",
              "new_cached = pre_len - req.already_computed",
              "cached_tokens counts the admitted prefix (every reused token) once"),
    Invariant("sglang.srt.managers.scheduler.Scheduler.run_event_loop",
              "StreamContext(self.schedule_stream)",
              "the extend hook's chunk KV copies are enqueued on the schedule stream (overlap scheduler)"),
    Invariant("sglang.srt.managers.scheduler.Scheduler.run_batch",
              "self.forward_stream.wait_stream(self.schedule_stream)",
              "the forward runs after the schedule stream's work: chunk KV copies land before attention reads them"),
    # Overlap scheduler: chunk KV copies and probes read store KV on the schedule stream while the
    # previous forward may still run. Safe only behind SGLang's coarse WAR barrier, which it applies
    # when a backend's extend publishes no earlier read-done event (shared_read_ends UNKNOWN:
    # torch_native, FlashInfer and FA3 do not override it; tests/test_hook_contract.py checks that).
    Invariant("sglang.srt.managers.scheduler.Scheduler.event_loop_overlap", "self._apply_war_barrier()",
              "every launched batch fences the schedule stream behind its forward"),
    Invariant("sglang.srt.managers.scheduler.Scheduler._apply_war_barrier",
              "self.schedule_stream.wait_stream(self.forward_stream)",
              "without a read-done event the schedule stream waits for the whole forward"),
    Invariant(f"{_ATTN}.base_attn_backend.AttentionBackend.shared_read_ends", "return SharedReadEnds.UNKNOWN",
              "an extend's shared reads end at UNKNOWN unless a backend declares otherwise"),
    Invariant("sglang.srt.model_executor.runner_utils.shared_read_event.maybe_publish_prefill_shared_read_done",
              "if shared_read_ends is not SharedReadEnds.PRE_REPLAY:",
              "an UNKNOWN read end publishes no read-done event, so the coarse barrier applies"),
    # The FA3 hole path rewrites the extend metadata; SGLang's forward_extend must hand it to the kernel as is.
    Invariant(f"{_ATTN}.flashattention_backend.FlashAttentionBackend.forward_extend",
              "cache_seqlens = metadata.cache_seqlens_int32",
              "each run's key count (its end) reaches flash_attn_with_kvcache"),
    Invariant(f"{_ATTN}.flashattention_backend.FlashAttentionBackend.forward_extend",
              "causal=False if use_cascade_attn else causal",
              "extends run causal (bottom-right aligned): query i of a run [s, e) sees keys [0, s + i]"),
)


class ContractError(RuntimeError):
    """An SGLang target sglang-holes relies on is missing or has another shape."""


def _resolve(dotted: str) -> Any:
    obj_path, attr = dotted.rsplit(".", 1)
    try:
        return getattr(pkgutil.resolve_name(obj_path), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ContractError(f"SGLang target {dotted} is gone ({type(e).__name__}: {e})") from None


def our_hook(spec: HookSpec) -> Any:
    module, name = spec.hook.split(":")
    return getattr(importlib.import_module(f"sglang_holes.patches.{module}"), name)


def check_hook(spec: HookSpec) -> None:
    """``ContractError`` unless ``spec.target`` exists, starts with ``spec.params`` and our hook accepts
    the call HookRegistry makes: ``(result | original,)`` for after | around hooks, then the target's arguments."""
    if spec.kind not in ("before", "after", "around"):
        raise ContractError(f"{spec.target}: unknown hook kind {spec.kind!r}")
    target = _resolve(spec.target)
    fn = inspect.unwrap(getattr(target, "__func__", target))
    names = [p.name for p in inspect.signature(fn).parameters.values()]
    if tuple(names[: len(spec.params)]) != spec.params:
        raise ContractError(f"{spec.target} takes {names}; sglang-holes expects it to start with {list(spec.params)}")
    lead = () if spec.kind == "before" else (object(),)
    try:
        inspect.signature(our_hook(spec)).bind(*lead, *(object() for _ in names))
    except TypeError as e:
        raise ContractError(f"hook {spec.hook} cannot take the arguments of {spec.target}: {e}") from None


def check_registry(entry: RegistryEntry) -> None:
    registry = _resolve(entry.registry)
    if isinstance(registry, dict):
        if entry.key not in registry:
            raise ContractError(f"{entry.registry} has no {entry.key!r} entry to wrap")
    elif not callable(registry):
        raise ContractError(f"{entry.registry} is neither a registry dict nor a registering function")


def check_subclassed(sub: Subclassed) -> None:
    cls = _resolve(sub.cls)
    missing = [m for m in sub.methods if not callable(getattr(cls, m, None))]
    if missing:
        raise ContractError(f"{sub.cls} no longer has {missing}")


def check_attributes(attrs: Attributes) -> None:
    """Dataclass fields, class attributes, or ``self.<name>`` assignments in the class source."""
    cls = _resolve(attrs.cls)
    known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    source = "".join(inspect.getsource(c) for c in cls.__mro__ if c.__module__.startswith("sglang."))
    missing = [a for a in attrs.names if a not in known and not hasattr(cls, a)
               and not re.search(rf"\bself\.{a}\s*(:[^=\n]*)?=", source)]
    if missing:
        raise ContractError(f"{attrs.cls} no longer sets {missing}")


def check_invariant(inv: Invariant) -> None:
    source = inspect.getsource(inspect.unwrap(_resolve(inv.target)))
    if inv.code not in source:
        raise ContractError(f"{inv.target} no longer contains `{inv.code}`, which sglang-holes relies on: {inv.why}")


def verify(cuda_only: bool | None = None) -> None:
    """Check every entry of the table against the installed SGLang (``ContractError`` on the first mismatch).

    Entries in ``CUDA_ONLY`` modules are checked when ``cuda_only`` (default: CUDA is available).
    """
    if cuda_only is None:
        import torch

        cuda_only = torch.cuda.is_available()

    def wanted(target: str) -> bool:
        return cuda_only or not target.startswith(CUDA_ONLY)

    for spec in HOOKS:
        check_hook(spec)
    for entry in REGISTRY_ENTRIES:
        check_registry(entry)
    for sub in filter(lambda s: wanted(s.cls), SUBCLASSED):
        check_subclassed(sub)
    for attrs in filter(lambda a: wanted(a.cls), ATTRIBUTES):
        check_attributes(attrs)
    for inv in filter(lambda i: wanted(i.target), INVARIANTS):
        check_invariant(inv)


def register_hooks() -> None:
    """Register every hook of ``HOOKS`` with SGLang's ``HookRegistry`` (applied by SGLang after plugins load)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for spec in HOOKS:
        HookRegistry.register(spec.target, our_hook(spec), HookType(spec.kind))
