"""Extend batches with reused KV: the ``ScheduleBatch.prepare_for_extend`` hook (plan, then commit).

A request with reused KV beyond its leading cached run (a hole request: ``HoleRadixCache.
match_prefix`` left a ``HoleFill`` in ``req.holes``; or a chunk request reusing stored chunks,
``patches/scheduler/chunk_reuse.py``) was admitted by SGLang in *virtual order*: its ``R`` reused
tokens as the prefix, then its other positions (``sglang_holes.cache.extend_plan``). Stock
``prepare_for_extend`` allocated one slot per extend position and wrote the row in virtual
order. The AFTER hook turns each such extend into what it really is, in two steps:

1. **plan** (pure, ``sglang_holes.cache.extend_plan.plan_hole_chunk``): per request, which
   real positions this extend covers, and which of them are queries (the rest get chunk KV
   copied into their slots);
2. **commit** (``_commit``, the only step that mutates the batch): the row rewritten in real
   position order, chunk copies, the compacted ``input_ids`` / ``out_cache_loc`` (queries only),
   ``extend_lens`` / ``prefix_lens`` (a virtual prefix that keeps ``seq = prefix + extend``),
   input-logprob target ids, counters and ``meta_info``, and ``batch.holes`` = every query's
   original position (stock requests: ``arange(prefix, seq)``), which the ForwardBatch hook
   hands to the model as ``positions`` (RoPE, and the attention backend's ``HolePlan``).

Requests the hook does not cover take SGLang's stock path (recompute from the first hole;
correct output) and are counted as fallbacks: multimodal inputs, input embeddings,
positional overrides, input logprobs of a hole request.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch

from sglang_holes.attention.plan import spans_from_positions
from sglang_holes.cache.extend_plan import HoleChunk, missing_positions, plan_hole_chunk
from sglang_holes.patches.attention.forward_batch import BATCH_ATTR
from sglang_holes.patches.scheduler.radix_cache import HoleRadixCache
from sglang_holes.patches.scheduler.request_holes import HoleFill, holes_of
from sglang_holes.patches.serving.meta_info import record_chunk_reuse, record_recomputed

logger = logging.getLogger("sglang_holes")


def _holes_cache(batch: Any) -> HoleRadixCache | None:
    tree = batch.tree_cache
    return tree if isinstance(tree, HoleRadixCache) and not batch.is_dllm() else None


def _plan_request(tree: HoleRadixCache, req: Any, slots: torch.Tensor) -> HoleChunk | None:
    """The request's plan for this extend (None: stock extend)."""
    rec = holes_of(req)
    if rec.fallback:  # KV beyond a hole it cannot use (see match_prefix): count once, when scheduled
        rec.fallback = False
        tree.count("fallbacks")
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
    if req.prefix_len != fill.virtual_prefix:  # a later chunk must continue where the last one ended
        raise RuntimeError(f"request {req.rid}: SGLang resumed a fill at {req.prefix_len}, "
                           f"expected {fill.virtual_prefix}")
    if fill.order is None:
        n = len(req.full_untruncated_fill_ids)
        fill.order = fill.chunk.order if fill.chunk is not None else missing_positions(fill.segments, n)
    return plan_hole_chunk(fill.order, fill.computed, int(slots.numel()),
                           None if fill.chunk is None else fill.chunk.copied)


def after_prepare_for_extend(result: Any, batch: Any, *_: Any, **__: Any) -> Any:
    setattr(batch, BATCH_ATTR, None)
    tree = _holes_cache(batch)
    if tree is None:
        return result
    starts = [0, *itertools.accumulate(batch.extend_lens)]
    slots = [batch.out_cache_loc[a:b] for a, b in itertools.pairwise(starts)]
    plans = [_plan_request(tree, req, s) for req, s in zip(batch.reqs, slots, strict=True)]
    if not any(p is not None for p in plans):
        for i, req in enumerate(batch.reqs):
            pre = batch.prefix_lens[i]
            record_recomputed(req, [(pre, pre + batch.extend_lens[i])])
            _count_plain_chunk_request(tree, req, pre)
        return result
    _commit(tree, batch, plans, starts)
    return result


def _commit(tree: HoleRadixCache, batch: Any, plans: list[HoleChunk | None], starts: list[int]) -> None:
    """Apply the plans to the batch (the one step that mutates it)."""
    ids_cpu, out = batch.prefill_input_ids_cpu, batch.out_cache_loc
    new_ids, new_out, positions, logprob_ids = [], [], [], _LogprobTargets(batch)
    for i, (req, plan) in enumerate(zip(batch.reqs, plans, strict=True)):
        ids_i, out_i = ids_cpu[starts[i] : starts[i + 1]], out[starts[i] : starts[i + 1]]
        pre, ext = batch.prefix_lens[i], batch.extend_lens[i]
        if plan is None:
            new_ids.append(ids_i)
            new_out.append(out_i)
            positions.append(torch.arange(pre, pre + ext, dtype=torch.int64))
            record_recomputed(req, [(pre, pre + ext)])
            _count_plain_chunk_request(tree, req, pre)
            continue
        fill = holes_of(req).fill
        ids_i, plan = _commit_fill_extend(tree, batch, req, plan, out_i)
        positions.append(plan.queries)
        nq = int(plan.queries.numel())
        if nq != ext:  # chunk copies are not queries: SGLang's forward sees the queries only
            # Host-built indices, not a device boolean mask: indexing with one would sync the device.
            q = plan.query.nonzero().flatten()
            ids_i, out_i = ids_i[q], out_i.index_select(0, q.to(out_i.device, non_blocking=True))
            batch.extend_lens[i] = nq
            batch.prefix_lens[i] = pre + ext - nq
        new_ids.append(ids_i)
        new_out.append(out_i)
        if fill.chunk is not None:
            batch.extend_logprob_start_lens[i] = logprob_ids.replace(i, req, plan.queries)
        if plan.last and fill.chunk is not None:
            tree.unlock(req.lock)  # copies are done: keep only the entries read in place
            req.lock = tree.lock(tree.chunks.borrowed_entries(req))
    batch.prefill_input_ids_cpu = torch.cat(new_ids)
    batch.out_cache_loc = torch.cat(new_out)
    batch.extend_num_tokens = int(sum(batch.extend_lens))
    logprob_ids.commit()
    setattr(batch, BATCH_ATTR, torch.cat(positions))


def _commit_fill_extend(tree: HoleRadixCache, batch: Any, req: Any, chunk: HoleChunk, slots: torch.Tensor
                        ) -> tuple[torch.Tensor, HoleChunk]:
    """One extend of a fill: chunk KV copied into the slots of its copied positions, every slot to its
    real position, the row rewritten in position order (SGLang wrote it in virtual order); counters
    and ``meta_info``. Returns the token ids of the extend's positions and the plan as committed (a
    request whose copy failed computes those positions instead: logged with its rid, counted)."""
    fill = holes_of(req).fill
    row = batch.req_to_token_pool.req_to_token[req.kv.req_pool_idx]
    n = len(req.full_untruncated_fill_ids)
    if fill.row is None:  # first extend: the reused spans, in place
        fill.row = torch.zeros(n, dtype=row.dtype, device=row.device)  # 0: SGLang's padding slot
        for g in fill.segments:
            if g.slots is not None:
                fill.row[g.start : g.end] = g.slots.to(row.device, row.dtype)
    if chunk.copies:
        copy = (~chunk.query).nonzero().flatten()
        try:
            tree.chunks.copy_in(fill.chunk, chunk.positions[copy], slots.index_select(0, copy.to(slots.device)))
        except Exception:  # the slots are the request's own: computing them instead is exact
            logger.exception("sglang-holes: chunk KV copy failed for request %s; it computes those positions",
                             req.rid)
            tree.count("request_errors")
            chunk = chunk.computing_all()
    fill.row[chunk.positions.to(row.device)] = slots.to(row.dtype)
    row[:n] = fill.row
    fill.computed += int(chunk.positions.numel())
    reused_beyond = [(g.start, g.end) for g in fill.segments if g.slots is not None and g.end > fill.prefix_len]
    # Never freed with the request's row: the reused spans, and positions not computed yet (what it
    # handed to a holder after earlier pieces stays the holder's: the ledger keeps those).
    tree.ledger.fill(req.kv.req_pool_idx, reused_beyond, chunk.uncomputed)
    record_recomputed(req, list(chunk.spans), continued=not chunk.first)
    stained = getattr(req, "retracted_stain", False)  # a re-prefill after a retraction is not a new request
    if fill.chunk is not None:
        _count_chunk_extend(tree, req, fill, chunk, stained)
    elif not stained:
        _count_hole_extend(tree, fill, chunk, n)
    return _token_ids(req)[chunk.positions], chunk


def _count_hole_extend(tree: HoleRadixCache, fill: HoleFill, chunk: HoleChunk, n: int) -> None:
    if chunk.first:
        tree.count("hole_requests")
        tree.count("reused_tokens", fill.reused)
    tree.count("recomputed_tokens", int(chunk.positions.numel()))
    if chunk.last:
        tree.count("hole_spans_filled", sum(1 for _, e in spans_from_positions(fill.order.tolist()) if e < n))


def _count_chunk_extend(tree: HoleRadixCache, req: Any, fill: HoleFill, chunk: HoleChunk, stained: bool) -> None:
    """SGLang counted the in-place prefix as cached; the copies count too (cached + recomputed = prompt)."""
    st = holes_of(req).chunk
    from_store = fill.chunk.reused - st.prefix_len  # the exact tree's prefix is not chunk reuse
    if chunk.first:
        tree.chunks.committed(req, from_store)
    forced = int((fill.chunk.copied[chunk.positions] & chunk.query).sum())  # a copy computed instead
    st.reused_tokens -= forced
    if not stained:
        req.cached_tokens += chunk.copies
        if chunk.first:
            tree.count("chunk_requests")
        tree.count("chunk_reused_tokens", (from_store - int(fill.chunk.copied.sum()) if chunk.first else 0)
                   + chunk.copies)
    record_chunk_reuse(req, st)


def _count_plain_chunk_request(tree: HoleRadixCache, req: Any, prefix_len: int) -> None:
    """A chunk request that reuses nothing: its ``meta_info`` report, at its first extend."""
    st = holes_of(req).chunk
    if st is not None and not prefix_len and tree.chunks is not None:
        record_chunk_reuse(req, st)


class _LogprobTargets:
    """``batch.extend_input_logprob_token_ids`` rebuilt for extends whose queries are not SGLang's
    virtual positions: the next prompt token of each query from the first logprob position on."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch
        self.old = batch.extend_input_logprob_token_ids if batch.return_logprob else None
        starts = batch.extend_logprob_start_lens if self.old is not None else batch.extend_lens
        self.bounds = [0, *itertools.accumulate(e - s for e, s in zip(batch.extend_lens, starts, strict=True))]
        self.parts: dict[int, torch.Tensor] = {}

    def replace(self, i: int, req: Any, queries: torch.Tensor) -> int:
        """Targets of request ``i``'s queries; returns its new ``extend_logprob_start_len``."""
        ids = req.origin_input_ids
        start = len(ids) if req.logprob_start_len == -1 else req.logprob_start_len
        wanted = queries[queries >= start].tolist() if req.return_logprob else []
        self.parts[i] = torch.tensor([ids[p + 1] if p + 1 < len(ids) else 0 for p in wanted], dtype=torch.int64)
        return int(queries.numel()) - len(wanted)

    def commit(self) -> None:
        if self.old is None or not self.parts:
            return
        out = [self.parts.get(i, self.old[a:b]) for i, (a, b) in enumerate(itertools.pairwise(self.bounds))]
        self.batch.extend_input_logprob_token_ids = torch.cat(out).to(self.old.dtype).clamp_(
            0, self.batch.model_config.vocab_size - 1)


def _token_ids(req: Any) -> torch.Tensor:
    ids = req.full_untruncated_fill_ids
    try:
        return torch.frombuffer(ids, dtype=torch.int64)
    except (TypeError, ValueError):
        return torch.tensor(list(ids), dtype=torch.int64)
