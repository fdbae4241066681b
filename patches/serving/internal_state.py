"""Report sglang-holes in the scheduler's internal state (``/get_server_info``).

An AFTER hook on ``SchedulerInternalStateController.get_internal_state`` adds a
``"sglang_holes"`` entry, computed inside the scheduler process. It is how a
user (and the smoke test) sees that the plugin really was loaded by SGLang in the
spawned scheduler, not only in the process that started it, and it reports the KV
pool's accounting and the ``holes`` tree's ``check_integrity()`` (the debug view the
tests use to prove no slot leaked). Read-only: it adds one key and changes no behaviour.
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any


def cache_state(scheduler: Any) -> dict[str, Any]:
    """Pool accounting and, for the ``holes`` backend, the tree's integrity check.

    ``available + evictable + protected + requests_own`` equals ``pool_size``; ``integrity`` is the
    pool audit (``patches/scheduler/pool_audit.py``): every page has one owner. Tests use it to prove that
    no slot leaked or was freed twice.
    """
    from sglang_holes.patches.scheduler.radix_cache import HoleRadixCache

    cache = getattr(scheduler, "tree_cache", None)
    alloc = getattr(scheduler, "token_to_kv_pool_allocator", None)
    out: dict[str, Any] = {"backend": type(cache).__name__}
    if alloc is not None:
        out["available"] = int(alloc.available_size())
        out["pool_size"] = int(alloc.size)
    if cache is not None:
        out["evictable"] = int(cache.evictable_size())
        out["protected"] = int(cache.protected_size())
    if isinstance(cache, HoleRadixCache):
        out["policy"] = cache.policy.name
        if cache.duel is not None:  # cost-aware's decay now; the shadows' decayed FLOPs (for a look: the
            # rule reads each request's FLOPs over the recent window, DecayDuel.choice)
            out["policy_decay"] = cache.policy.decay
            shadows = zip(cache.policy.decays, cache.duel.shadows, strict=True)
            out["policy_shadow_flops"] = {f"{d:g}": shadow.flops for d, shadow in shadows}
            out["policy_switch_confidence"] = cache.duel.switch_confidence
            out["policy_switches"] = cache.duel.switches
        out["hole_batches"] = "on" if cache.no_hole_batches is None else f"off: {cache.no_hole_batches}"
        out["stats"] = dict(cache.stats)
        if cache.chunks is not None:
            store = cache.chunks.store
            out["chunks"] = {"entries": len(store), "tokens": store.total_size, "locked": store.protected_size}
        from sglang_holes.patches.scheduler.pool_audit import audit_scheduler

        report = audit_scheduler(scheduler)  # one owner per page, counts add up, structures sound
        out["integrity"] = "ok" if report.ok else "FAILED: " + "; ".join(report.problems)
        out["requests_own"] = report.own_tokens
    return out


def plugin_state(scheduler: Any = None) -> dict[str, Any]:
    from sglang.srt.platforms import current_platform

    state: dict[str, Any] = {
        "version": metadata.version("sglang-holes"),
        "pid": os.getpid(),
        "platform": type(current_platform).__name__,
    }
    if scheduler is not None:
        from sglang_holes.patches.serving.rpc import ENDPOINT_ATTR

        state["rpc_endpoint"] = getattr(scheduler, ENDPOINT_ATTR, None)  # this rank's (data parallelism)
        state["cache"] = cache_state(scheduler)
    return state


def after_get_internal_state(result: Any, controller: Any = None, *_args: Any, **_kwargs: Any) -> Any:
    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        state["sglang_holes"] = plugin_state(getattr(controller, "scheduler", None))
    return result
