"""Prometheus counters of the ``holes`` cache (``--enable-metrics``).

Created in the scheduler process, after SGLang has set ``PROMETHEUS_MULTIPROC_DIR``,
so they are served by SGLang's own ``/metrics`` endpoint next to ``sglang:*``:

=============================================  =====================================================
``sglang_holes:reused_tokens_total``           cached prompt tokens reused by hole requests (all spans)
``sglang_holes:recomputed_tokens_total``       prompt tokens a hole request computed (holes + tail)
``sglang_holes:hole_spans_filled_total``       interior holes filled (the uncached tail not counted)
``sglang_holes:hole_requests_total``           requests that ran the hole path
``sglang_holes:fallbacks_total``               requests with KV beyond a hole that took the stock path
``sglang_holes:chunk_requests_total``          chunk-mode requests that reused stored chunk KV
``sglang_holes:chunk_reused_tokens_total``     prompt tokens such requests took from the chunk store
``sglang_holes:chunk_evicted_tokens_total``    chunk-store tokens evicted to free slots for the pool
=============================================  =====================================================
"""

from __future__ import annotations

from typing import Any

COUNTERS = {
    "reused_tokens": "Cached prompt tokens reused by requests whose cached path has holes.",
    "recomputed_tokens": "Prompt tokens computed by hole requests (holes and uncached tail).",
    "hole_spans_filled": "Interior holes recomputed and re-inserted into the cache.",
    "hole_requests": "Requests that ran the one-pass hole path.",
    "fallbacks": "Requests with cached KV beyond a hole that took SGLang's stock path.",
    "chunk_requests": "Chunk-mode (RAG) requests that reused stored chunk KV.",
    "chunk_reused_tokens": "Prompt tokens chunk-mode requests reused from the chunk store.",
    "chunk_evicted_tokens": "Chunk-store tokens evicted to free slots (chunks and prefixes share the pool).",
    "policy_switches": "Times cost-aware's shadow caches moved it to another decay (recency vs frequency).",
    "request_errors": "Requests whose reuse planning or chunk copy failed: served without it (logged with the rid).",
}


class HoleMetrics:
    """One labelled Prometheus counter per key of ``HoleRadixCache.stats``."""

    def __init__(self, model_name: str) -> None:
        from prometheus_client import Counter  # after SGLang set PROMETHEUS_MULTIPROC_DIR

        self._counters: dict[str, Any] = {
            key: Counter(name=f"sglang_holes:{key}", documentation=doc, labelnames=["model_name"]).labels(
                model_name=model_name)
            for key, doc in COUNTERS.items()
        }

    def inc(self, key: str, amount: int) -> None:
        if amount:
            self._counters[key].inc(amount)
