"""Our RPC methods (``evict_span``, ``chunk_kv``) reach the scheduler through SGLang's RPC channel.

An AROUND hook on ``Scheduler.handle_rpc_request`` answers the methods
``sglang_holes.evict_span`` and ``sglang_holes.chunk_kv`` itself (every other method
goes to SGLang unchanged). The reply is SGLang's ``RpcReqOutput``: ``success`` and a
JSON ``message`` carrying the result, or the error for bad input (the server keeps
serving).

Data parallelism: each DP rank's scheduler connects to an RPC endpoint of its own, which
nothing in the serving process binds (SGLang's ``rpc_ipc_name`` reaches no rank). An AFTER
hook on ``Scheduler.init_ipc_channels`` records each rank's endpoint, ``/get_server_info``
reports it, and ``RankChannels`` binds one socket per rank: an eviction goes to every
rank and answers with the total freed.
"""

from __future__ import annotations

import json
import threading
from typing import Any

ENDPOINT_ATTR = "holes_rpc_endpoint"  # on the Scheduler: its RPC endpoint (set at start)

EVICT_SPAN = "sglang_holes.evict_span"
CHUNK_KV = "sglang_holes.chunk_kv"


def around_rpc(original: Any, scheduler: Any, recv_req: Any, *args: Any, **kwargs: Any) -> Any:
    method = getattr(recv_req, "method", None)
    if method not in (EVICT_SPAN, CHUNK_KV):
        return original(scheduler, recv_req, *args, **kwargs)
    from sglang.srt.managers.io_struct import RpcReqOutput

    from sglang_holes.patches.scheduler.radix_cache import HoleRadixCache

    cache = scheduler.tree_cache
    p = recv_req.parameters or {}
    try:
        check_token_ids(p.get("tokens" if method == CHUNK_KV else "input_ids") or [],
                        scheduler.model_config.vocab_size)
        if not isinstance(cache, HoleRadixCache):
            raise ValueError(f"{method} needs the holes radix cache (--radix-cache-backend holes)")
        if method == CHUNK_KV:
            if cache.chunks is None:
                raise ValueError("chunk reuse is not enabled on this server")
            k, v, offset = cache.chunks.read(p.get("tokens") or [], (p.get("extra_key"), p.get("cache_salt")),
                                            p.get("layer", 0), p.get("offset"))
            return RpcReqOutput(success=True, message=json.dumps({"k": k.tolist(), "v": v.tolist(),
                                                                  "offset": offset}))
        freed = cache.evict_span(p.get("input_ids") or [], p.get("start"), p.get("end"),
                                p.get("extra_key"), p.get("cache_salt"))
        return RpcReqOutput(success=True, message=json.dumps({"freed_tokens": freed}))
    except (ValueError, TypeError) as e:
        return RpcReqOutput(success=False, message=str(e))


def check_token_ids(ids: Any, vocab_size: int, what: str = "input_ids") -> None:
    """``ValueError`` unless every id is an integer in ``[0, vocab_size)`` (one id out of it would index
    past the embedding table inside the scheduler)."""
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{what} holds {len(bad)} token ids outside the vocabulary [0, {vocab_size}) "
                         f"(e.g. {bad[:3]})")


def evict_span_params(input_ids: Any, start: Any, end: Any, extra_key: Any = None,
                      cache_salt: Any = None) -> dict[str, Any]:
    """Validate the request shape on the caller's side (the scheduler checks the span itself).

    ``extra_key`` / ``cache_salt``: the namespace the prompt was cached under (as given to
    ``/generate``; None for the default namespace).
    """
    if not isinstance(input_ids, list | tuple) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in input_ids):
        raise ValueError("input_ids must be a list of token ids (integers)")
    for name, value in (("start", start), ("end", end)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    for name, value in (("extra_key", extra_key), ("cache_salt", cache_salt)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
    return {"input_ids": [int(t) for t in input_ids], "start": start, "end": end,
            "extra_key": extra_key, "cache_salt": cache_salt or None}


def call_evict_span(sock: Any, params: dict[str, Any], timeout_s: float = 60.0) -> int:
    """Send ``sglang_holes.evict_span`` on a DEALER socket bound to SGLang's RPC endpoint.

    Returns the freed token count; raises ``ValueError`` with the scheduler's message for
    bad input and ``TimeoutError`` if the scheduler does not answer in ``timeout_s``.
    """
    return int(call_rpc(sock, EVICT_SPAN, params, timeout_s)["freed_tokens"])


def call_rpc(sock: Any, method: str, params: dict[str, Any], timeout_s: float = 60.0) -> dict[str, Any]:
    """One of our RPC methods -> its JSON reply (``ValueError`` / ``TimeoutError`` as above)."""
    import zmq
    from sglang.srt.managers.io_struct import RpcReqInput, sock_recv, sock_send

    while sock.poll(0, zmq.POLLIN):  # a late reply to a call that timed out: replies carry no id
        sock_recv(sock)
    sock_send(sock, RpcReqInput(method=method, parameters=params))
    if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
        raise TimeoutError(f"the scheduler did not answer {method} within {timeout_s:.0f} s")
    reply = sock_recv(sock)
    if not reply.success:
        raise ValueError(reply.message)
    return json.loads(reply.message)


def after_init_ipc_channels(result: Any, scheduler: Any, port_args: Any, *_: Any, **__: Any) -> Any:
    setattr(scheduler, ENDPOINT_ATTR, getattr(port_args, "rpc_ipc_name", None))
    return result


def rank_endpoints(internal_states: list[dict]) -> list[str]:
    """Every DP rank's RPC endpoint from ``/get_server_info``'s ``internal_states`` (one per rank)."""
    out = [s.get("sglang_holes", {}).get("rpc_endpoint") for s in internal_states]
    if not out or any(e is None for e in out):
        raise ValueError("the server did not report every data-parallel rank's RPC endpoint")
    return out


class RankChannels:
    """One DEALER socket bound at each rank's RPC endpoint; one call in flight at a time (replies
    carry no id). ``known``: sockets already bound (the engine's own, at SGLang's endpoint)."""

    def __init__(self, known: dict[str, Any] | None = None) -> None:
        self._socks: dict[str, Any] = dict(known or {})
        self._lock = threading.Lock()

    def bind(self, endpoint: str) -> None:
        """Bind ``endpoint`` now (a scheduler connecting to it finds it at once)."""
        with self._lock:
            self._sock(endpoint)

    def _sock(self, endpoint: str) -> Any:
        if endpoint not in self._socks:
            import zmq
            from sglang.srt.utils.network import get_zmq_socket

            self._socks[endpoint] = get_zmq_socket(zmq.Context.instance(), zmq.DEALER, endpoint, True)
        return self._socks[endpoint]

    def evict_span(self, endpoints: list[str], params: dict[str, Any], timeout_s: float = 60.0) -> int:
        """``evict_span`` on every rank: the total freed. ``ValueError`` if no rank holds the prompt,
        or with the first other refusal (a locked span, a bad span); ranks that held it are evicted."""
        freed, refusals = 0, []
        with self._lock:
            for endpoint in endpoints:
                try:
                    freed += call_evict_span(self._sock(endpoint), params, timeout_s)
                except ValueError as e:
                    refusals.append(str(e))
        other = [r for r in refusals if "not in the cache" not in r]
        if other or len(refusals) == len(endpoints):
            raise ValueError(other[0] if other else refusals[0])
        return freed
