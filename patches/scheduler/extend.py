"""Extend batches with reused KV: the ``ScheduleBatch.prepare_for_extend`` hook (plan, then commit).

A request with reused KV beyond its leading cached run (a hole request: ``HoleRadixCache.
match_prefix`` left a ``HoleFill`` in ``req.holes``; or a request reusing stored RAG documents,
``patches/scheduler/chunk_reuse.py``) was admitted by SGLang in *virtual order*: its ``R`` reused
tokens as the prefix, then its other positions (``sglang_holes.cache.extend_plan``). Stock
``prepare_for_extend`` allocated one slot per extend position and wrote the row in virtual
order. The AFTER hook turns each such extend into what it really is, in two steps:

1. **plan** (pure, ``sglang_holes.cache.extend_plan.plan_piece``): per request, the
   ``PrefillPiece`` this extend is: which real positions it covers, and which of them are
   queries (the rest get stored document KV copied into their slots);
2. **commit** (``_commit``, the only step that mutates the batch): the row rewritten in real
   position order, document KV copies, the compacted ``input_ids`` / ``out_cache_loc`` (queries
   only), ``extend_lens`` / ``prefix_lens`` (a virtual prefix that keeps ``seq = prefix +
   extend``), input-logprob target ids, counters and ``meta_info``; and the batch's frozen
   ``BatchHoles`` (every query's original position, stock requests' ``arange(prefix, seq)``),
   left on the batch for the ``ForwardBatch`` hook (``patches/attention/forward_batch.py``),
   which hands it to the model (``positions``: RoPE) and to the attention backend.

Every extend batch of a ``holes`` server gets a ``BatchHoles`` (``fills`` 0 when no request
reuses KV beyond its prefix). Requests the hook does not cover take SGLang's stock path
(recompute from the first hole; correct output) and are counted as fallbacks: multimodal
inputs, input embeddings, positional overrides, input logprobs of a hole request.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch

from sglang_holes.attention.batch_holes import BatchHoles
from sglang_holes.cache.extend_plan import PrefillPiece, missing_positions, plan_piece
from sglang_holes.patches.attention.forward_batch import HOLES_ATTR
from sglang_holes.patches.scheduler.extend_counts import count_extend, record_stock_extend
from sglang_holes.patches.scheduler.logprob_targets import LogprobTargets
from sglang_holes.patches.scheduler.radix_cache import HoleRadixCache
from sglang_holes.patches.scheduler.request_holes import holes_of

logger = logging.getLogger("sglang_holes")


def _holes_cache(batch: Any) -> HoleRadixCache | None:
    cache = batch.tree_cache
    return cache if isinstance(cache, HoleRadixCache) and not batch.is_dllm() else None


def _plan_request(cache: HoleRadixCache, req: Any, slots: torch.Tensor) -> PrefillPiece | None:
    """The request's piece for this extend (None: a stock extend)."""
    rec = holes_of(req)
    if rec.fallback:  # KV beyond a hole it cannot use (see match_prefix): count once, when scheduled
        rec.fallback = False
        cache.count("fallbacks")
    fill = rec.fill
    if fill is None:
        return None
    if fill.computed == 0 and (req.prefix_len != fill.reused or req.last_node is not fill.node):
        # SGLang replaced the match after match_prefix (SGLANG_RADIX_FORCE_MISS zeroes it): the
        # reused spans are not locked for this request, so they are not used. SGLang's replacement
        # keeps the tree-owned length we reported (MatchResult._replace): the row is all its own now.
        rec.fill = None
        req.kv.cache_protected_len = req.prefix_len
        return None
    if req.prefix_len != fill.virtual_prefix:  # a later piece must continue where the last one ended
        raise RuntimeError(f"request {req.rid}: SGLang resumed a fill at {req.prefix_len}, "
                           f"expected {fill.virtual_prefix}")
    if fill.order is None:
        n = len(req.full_untruncated_fill_ids)
        fill.order = fill.chunk.order if fill.chunk is not None else missing_positions(fill.segments, n)
    return plan_piece(fill.order, fill.computed, int(slots.numel()),
                      None if fill.chunk is None else fill.chunk.copied)


def after_prepare_for_extend(result: Any, batch: Any, *_: Any, **__: Any) -> Any:
    cache = _holes_cache(batch)
    if cache is None:
        return result
    starts = [0, *itertools.accumulate(batch.extend_lens)]
    slots = [batch.out_cache_loc[a:b] for a, b in itertools.pairwise(starts)]
    pieces = [_plan_request(cache, req, s) for req, s in zip(batch.reqs, slots, strict=True)]
    _commit(cache, batch, pieces, starts)
    return result


def _commit(cache: HoleRadixCache, batch: Any, pieces: list[PrefillPiece | None], starts: list[int]) -> None:
    """Apply the pieces to the batch (the one step that mutates it) and leave its ``BatchHoles``."""
    fills = sum(p is not None for p in pieces)
    if not fills:  # nothing to rewrite: SGLang's batch stands as built
        queries = [torch.arange(p, p + e, dtype=torch.int64) for p, e in zip(batch.prefix_lens, batch.extend_lens,
                                                                             strict=True)]
        for req, pre, ext in zip(batch.reqs, batch.prefix_lens, batch.extend_lens, strict=True):
            record_stock_extend(cache, req, pre, ext)
        setattr(batch, HOLES_ATTR, _batch_holes(batch, queries, 0))
        return
    ids_cpu, out = batch.prefill_input_ids_cpu, batch.out_cache_loc
    new_ids, new_out, queries, logprob_ids = [], [], [], LogprobTargets(batch)
    for i, (req, piece) in enumerate(zip(batch.reqs, pieces, strict=True)):
        ids_i, out_i = ids_cpu[starts[i] : starts[i + 1]], out[starts[i] : starts[i + 1]]
        pre, ext = batch.prefix_lens[i], batch.extend_lens[i]
        if piece is None:
            new_ids.append(ids_i)
            new_out.append(out_i)
            queries.append(torch.arange(pre, pre + ext, dtype=torch.int64))
            record_stock_extend(cache, req, pre, ext)
            continue
        fill = holes_of(req).fill
        ids_i, piece = _commit_piece(cache, batch, req, piece, out_i)
        queries.append(piece.queries)
        nq = int(piece.queries.numel())
        if nq != ext:  # copied document KV is not a query: SGLang's forward sees the queries only
            # Host-built indices, not a device boolean mask: indexing with one would sync the device.
            q = piece.query.nonzero().flatten()
            ids_i, out_i = ids_i[q], out_i.index_select(0, q.to(out_i.device, non_blocking=True))
            batch.extend_lens[i] = nq
            batch.prefix_lens[i] = pre + ext - nq
        new_ids.append(ids_i)
        new_out.append(out_i)
        if fill.chunk is not None:
            batch.extend_logprob_start_lens[i] = logprob_ids.replace(i, req, piece.queries)
        if piece.last and fill.chunk is not None:
            cache.unlock(req.lock)  # copies are done: keep only the entries read in place
            req.lock = cache.lock(cache.chunks.borrowed_entries(req))
    batch.prefill_input_ids_cpu = torch.cat(new_ids)
    batch.out_cache_loc = torch.cat(new_out)
    batch.extend_num_tokens = int(sum(batch.extend_lens))
    logprob_ids.commit()
    setattr(batch, HOLES_ATTR, _batch_holes(batch, queries, fills))


def _batch_holes(batch: Any, queries: list[torch.Tensor], fills: int) -> BatchHoles:
    rows = [req.kv.req_pool_idx for req in batch.reqs]
    seq_lens = [p + e for p, e in zip(batch.prefix_lens, batch.extend_lens, strict=True)]
    return BatchHoles.build(rows, seq_lens, queries, fills)


def _commit_piece(cache: HoleRadixCache, batch: Any, req: Any, piece: PrefillPiece, slots: torch.Tensor
                  ) -> tuple[torch.Tensor, PrefillPiece]:
    """One prefill piece of a fill: stored document KV copied into the slots of its copied positions,
    every slot to its real position, the row rewritten in position order (SGLang wrote it in virtual
    order); counters and ``meta_info``. Returns the token ids of the piece's positions and the piece as
    committed (a request whose copy failed computes those positions instead: logged with its rid, counted)."""
    fill = holes_of(req).fill
    row = batch.req_to_token_pool.req_to_token[req.kv.req_pool_idx]
    n = len(req.full_untruncated_fill_ids)
    if fill.row is None:  # first piece: the reused spans, in place
        fill.row = torch.zeros(n, dtype=row.dtype, device=row.device)  # 0: SGLang's padding slot
        for g in fill.segments:
            if g.slots is not None:
                fill.row[g.start : g.end] = g.slots.to(row.device, row.dtype)
    if piece.copies:
        copy = (~piece.query).nonzero().flatten()
        try:
            cache.chunks.copy_in(fill.chunk, piece.positions[copy], slots.index_select(0, copy.to(slots.device)))
        except Exception:  # the slots are the request's own: computing them instead is exact
            logger.exception("sglang-holes: document KV copy failed for request %s; it computes those positions",
                             req.rid)
            cache.count("request_errors")
            piece = piece.computing_all()
    fill.row[piece.positions.to(row.device)] = slots.to(row.dtype)
    row[:n] = fill.row
    fill.computed += int(piece.positions.numel())
    reused_beyond = [(g.start, g.end) for g in fill.segments if g.slots is not None and g.end > fill.tree_owned]
    # Never freed with the request's row: the reused spans, and positions not computed yet (what it
    # handed to a holder after earlier pieces stays the holder's: the ledger keeps those).
    cache.ledger.fill(req.kv.req_pool_idx, reused_beyond, piece.uncomputed)
    count_extend(cache, req, piece)
    return _token_ids(req)[piece.positions], piece


def _token_ids(req: Any) -> torch.Tensor:
    ids = req.full_untruncated_fill_ids
    try:
        return torch.frombuffer(ids, dtype=torch.int64)
    except (TypeError, ValueError):
        return torch.tensor(list(ids), dtype=torch.int64)
