"""The KV pool's ownership, read from a running scheduler and audited (``sglang_holes.cache.slot_ledger``).

``census(scheduler)`` reads, at one instant, every owner of the pool: the allocator's free
pages, the ``holes`` cache's holders (each namespace's tree, the chunk store) and each live
request's own row positions (SGLang's own list of requests that hold a row,
``SchedulerInvariantChecker._requests_owning_rows``, with the ledger's spans taken out).

Live integrity (``HolesConfig.check_integrity``, ``SGLANG_HOLES_CHECK_INTEGRITY=1``): a BEFORE
hook on ``Scheduler.get_next_batch_to_run`` audits the pool at the top of every scheduler
iteration, where the previous step is complete (its results processed, finished requests
released) and the next has not been planned; a broken pool raises ``LedgerError`` naming the
offending pages and owners, which stops the scheduler: loud, before a corrupted slot is read.
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_holes.cache.slot_ledger import AuditReport, LedgerError, PoolCensus, RowCensus, audit


def _own_slots(cache: Any, req: Any) -> torch.Tensor:
    """Slot ids of the request's own row positions: ``[cache_protected_len, end)`` minus the ledger's
    spans, where ``end`` covers the allocated length and, mid-fill, the whole prompt (a fill's
    computed positions are real positions, its allocated length a virtual one)."""
    kv = req.kv
    end = int(kv.kv_allocated_len)
    fill = getattr(getattr(req, "holes", None), "fill", None)
    if fill is not None and fill.row is not None:
        end = max(end, int(fill.row.numel()))
    row = cache.req_to_token_pool.req_to_token[kv.req_pool_idx]
    spans = cache.ledger.owned(kv.req_pool_idx, [(int(kv.cache_protected_len), end)])
    parts = [row[s:e] for s, e in spans]
    return torch.cat(parts) if parts else row[:0]


def census(scheduler: Any) -> PoolCensus:
    """Every owner of the pool of a scheduler running the ``holes`` cache, read now."""
    cache = scheduler.tree_cache
    alloc = scheduler.token_to_kv_pool_allocator
    holders = {f"tree {ns}": t.owned_slots() for ns, t in cache.namespaces.items()}
    if cache.chunks is not None:
        holders["chunk store"] = cache.chunks.store.owned_slots()
    reqs = scheduler.invariant_checker._requests_owning_rows()
    rows = [RowCensus(str(req.rid), _own_slots(cache, req)) for req in reqs]
    stale = sorted(set(cache.ledger.rows()) - {int(req.kv.req_pool_idx) for req in reqs})
    return PoolCensus(int(alloc.size), int(alloc.page_size), alloc.get_all_free_pages(), holders, rows,
                      int(alloc.available_size()), int(cache.evictable_size()), int(cache.protected_size()),
                      stale)


def audit_scheduler(scheduler: Any) -> AuditReport:
    """The structures' own checks, then the pool census; a failed structure check is a problem too."""
    cache = scheduler.tree_cache
    try:
        cache.check_integrity()
    except AssertionError as e:
        return AuditReport([f"structure check failed: {e}"], 0)
    return audit(census(scheduler))


def before_get_next_batch_to_run(scheduler: Any, *_: Any, **__: Any) -> None:
    from sglang_holes.patches.scheduler.radix_cache import HoleRadixCache

    cache = getattr(scheduler, "tree_cache", None)
    if not isinstance(cache, HoleRadixCache) or not cache.config.check_integrity:
        return None
    report = audit_scheduler(scheduler)
    if not report.ok:
        raise LedgerError(report.problems)
    return None
