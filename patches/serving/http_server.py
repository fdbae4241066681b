"""``POST /holes/evict`` on SGLang's HTTP server.

Added by a BEFORE hook on ``http_server._setup_and_run_http_server`` (the point where
SGLang hands the app its ``PortArgs``), only for servers that run
``--radix-cache-backend holes``. Body: ``{"input_ids": [...], "start": s, "end": e}``
(half-open token positions of a cached prompt). Answers ``200 {"freed_tokens": n}``;
``400 {"error": ...}`` for a malformed body, a prompt not in the cache, an empty,
reversed or out-of-range span, or KV locked by a running request (the cache is then
unchanged); ``504`` if the scheduler does not answer.

The request reaches the scheduler like ``Engine.evict_span`` does: through SGLang's
RPC endpoint (``PortArgs.rpc_ipc_name``), on a DEALER socket this hook binds, as
``sglang.Engine`` does for its ``collective_rpc``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request  # module level: FastAPI resolves the (string) annotation here
from fastapi.responses import ORJSONResponse

from sglang_holes.patches.launch.hooks import BACKEND_NAME
from sglang_holes.patches.serving.rpc import RankChannels, evict_span_params, rank_endpoints

ROUTE = "/holes/evict"


def add_evict_route(app: Any, rpc_endpoint: str, tokenizer_manager: Any) -> None:
    """``POST /holes/evict``: to the one scheduler, or, with data parallelism, to every rank."""
    ranks = RankChannels()
    dp = getattr(tokenizer_manager.server_args, "dp_size", 1) > 1
    if not dp:
        ranks.bind(rpc_endpoint)

    async def endpoints() -> list[str]:
        if not dp:
            return [rpc_endpoint]
        return rank_endpoints(await tokenizer_manager.get_internal_state())

    async def evict(request: Request) -> ORJSONResponse:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object {input_ids, start, end[, extra_key, cache_salt]}")
            unknown = set(body) - {"input_ids", "start", "end", "extra_key", "cache_salt"}
            if unknown:
                raise ValueError(f"unknown fields: {sorted(unknown)}")
            params = evict_span_params(body.get("input_ids"), body.get("start"), body.get("end"),
                                       body.get("extra_key"), body.get("cache_salt"))
            freed = await asyncio.to_thread(ranks.evict_span, await endpoints(), params)
        except TimeoutError as e:
            return ORJSONResponse({"error": str(e)}, status_code=504)
        except ValueError as e:  # includes malformed JSON (json.JSONDecodeError)
            return ORJSONResponse({"error": str(e)}, status_code=400)
        return ORJSONResponse({"freed_tokens": freed})

    app.add_api_route(ROUTE, evict, methods=["POST"])


def before_setup(server_args: Any, tokenizer_manager: Any, template_manager: Any, port_args: Any,
                  *args: Any, **kwargs: Any) -> None:
    if getattr(server_args, "radix_cache_backend", None) == BACKEND_NAME:
        from sglang.srt.entrypoints import http_server

        add_evict_route(http_server.app, port_args.rpc_ipc_name, tokenizer_manager)
    return None
