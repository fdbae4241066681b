"""``Engine.evict_span`` and ``POST /holes/evict`` reach the scheduler through SGLang's RPC channel.

An AROUND hook on ``Scheduler.handle_rpc_request`` answers the method
``sglang_holes.evict_span`` itself (every other method goes to SGLang unchanged). The
reply is SGLang's ``RpcReqOutput``: ``success`` and a JSON ``message`` carrying the
number of freed tokens, or the error for bad input (the server keeps serving).
"""

from __future__ import annotations

import json
from typing import Any

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGET = "sglang.srt.managers.scheduler.Scheduler.handle_rpc_request"
EVICT_SPAN = "sglang_holes.evict_span"


def _around_rpc(original: Any, scheduler: Any, recv_req: Any, *args: Any, **kwargs: Any) -> Any:
    if getattr(recv_req, "method", None) != EVICT_SPAN:
        return original(scheduler, recv_req, *args, **kwargs)
    from sglang.srt.managers.io_struct import RpcReqOutput

    from sglang_holes.patches.radix_cache import HoleRadixCache

    tree = scheduler.tree_cache
    p = recv_req.parameters or {}
    try:
        if not isinstance(tree, HoleRadixCache):
            raise ValueError("evict_span needs the holes radix cache (--radix-cache-backend holes)")
        freed = tree.evict_span(p.get("input_ids") or [], p.get("start"), p.get("end"),
                                p.get("extra_key"), p.get("cache_salt"))
        return RpcReqOutput(success=True, message=json.dumps({"freed_tokens": freed}))
    except (ValueError, TypeError) as e:
        return RpcReqOutput(success=False, message=str(e))


def register() -> None:
    HookRegistry.register(TARGET, _around_rpc, HookType.AROUND)
