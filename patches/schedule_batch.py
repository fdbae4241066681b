"""Extend batches with holes: the ``ScheduleBatch.prepare_for_extend`` hooks (plan, then commit).

A request whose cached path has holes (``HoleRadixCache.match_prefix`` left a
``HoleMatch`` in ``req.holes``) is admitted by SGLang as if only its leading cached run
``[0, P0)`` were cached: stock ``prepare_for_extend`` allocates ``n - P0`` new slots and
writes ``row[P0:n]`` with them. The AFTER hook turns it into a hole request in two steps:

1. **plan** (pure, ``sglang_holes.cache.extend_plan``): per request, an ``ExtendPlan``:
   which positions reuse KV (the tree's slots, borrowed; or chunk KV placed by
   ``ChunkReuse.place``), which are recomputed, which allocated slots are surplus;
2. **commit** (``_commit``, the only step that mutates the batch): row writes, the
   compacted ``input_ids`` / ``out_cache_loc`` (missing tokens only, in position order),
   ``extend_lens = m``, ``prefix_lens = n - m`` (a virtual prefix that keeps
   ``seq = prefix + extend``), ``cached_tokens``, counters, freeing the surplus, and
   ``batch.holes`` = every query's original position (stock requests:
   ``arange(prefix, seq)``), which the ForwardBatch hook hands to the model as
   ``positions`` (RoPE, and the attention backend's ``HolePlan``).

Chunk-mode requests (RAG, ``patches/radix_cache_chunks.py``) take the same route: the
BEFORE hook looks up and locks their chunks before allocation.

Requests the hook does not cover take SGLang's stock path (recompute from the first
hole; correct output) and are counted as fallbacks: chunked prefill, multimodal
inputs, input embeddings, positional overrides, input logprobs.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from sglang_holes.attention.plan import spans_from_positions
from sglang_holes.cache.extend_plan import ExtendPlan, HoleChunk, missing_positions, plan_hole_chunk
from sglang_holes.patches.forward_batch import BATCH_ATTR
from sglang_holes.patches.meta_info import record_chunk_reuse, record_recomputed
from sglang_holes.patches.radix_cache import HoleRadixCache
from sglang_holes.patches.request_holes import holes_of


def _holes_cache(batch: Any) -> HoleRadixCache | None:
    tree = batch.tree_cache
    return tree if isinstance(tree, HoleRadixCache) and not batch.is_dllm() else None


def before_prepare_for_extend(batch: Any, *_: Any, **__: Any) -> None:
    """Chunk requests look up and lock their chunks before allocation can evict them."""
    tree = _holes_cache(batch)
    if tree is None or tree.chunks is None:
        return
    chunk_reqs = [r for r in batch.reqs if holes_of(r).chunk_hints is not None]
    if not chunk_reqs:
        return
    # Admission budgeted every extend token; pinning hits must leave that much allocatable.
    need = sum(r.extend_end - r.prefix_len for r in batch.reqs)
    room = tree.token_to_kv_pool_allocator.available_size() + tree.evictable_size() - need
    for req in chunk_reqs:
        room -= tree.chunks.admit(req, max(room, 0))


def _plan_request(tree: HoleRadixCache, req: Any, slots: torch.Tensor) -> ExtendPlan | HoleChunk | None:
    """The request's plan (None: stock extend)."""
    rec = holes_of(req)
    if rec.fallback:  # KV beyond a hole it cannot use (see match_prefix): count once, when scheduled
        rec.fallback = False
        tree.count("fallbacks")
    if rec.chunk is not None and tree.chunks is not None:
        plan = tree.chunks.place(req, tree.token_to_kv_pool_allocator.get_kvcache(), slots)
        if plan is None:  # nothing reused: still report the chunk request (committed plans report theirs)
            record_chunk_reuse(req, rec.chunk)
        return plan
    fill = rec.fill
    if fill is None:
        return None
    if fill.computed == 0 and (req.prefix_len != fill.reused or req.last_node is not fill.node):
        # SGLang replaced the match after match_prefix (SGLANG_RADIX_FORCE_MISS zeroes it): the
        # reused spans are not locked for this request, so they are not used.
        rec.fill = None
        return None
    if req.prefix_len != fill.virtual_prefix:  # a later chunk must continue where the last one ended
        raise RuntimeError(f"request {req.rid}: SGLang resumed a hole fill at {req.prefix_len}, "
                           f"expected {fill.virtual_prefix}")
    if fill.missing is None:
        fill.missing = missing_positions(fill.segments, len(req.full_untruncated_fill_ids))
    return plan_hole_chunk(fill.missing, fill.computed, int(slots.numel()))


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
        return result
    _commit(tree, batch, plans, starts)
    return result


def _commit(tree: HoleRadixCache, batch: Any, plans: list[ExtendPlan | HoleChunk | None], starts: list[int]) -> None:
    """Apply the plans to the batch (the one step that mutates it)."""
    ids_cpu, out = batch.prefill_input_ids_cpu, batch.out_cache_loc
    new_ids, new_out, positions, surplus = [], [], [], []
    for i, (req, plan) in enumerate(zip(batch.reqs, plans, strict=True)):
        ids_i, out_i = ids_cpu[starts[i] : starts[i + 1]], out[starts[i] : starts[i + 1]]
        pre, ext = batch.prefix_lens[i], batch.extend_lens[i]
        if isinstance(plan, HoleChunk):
            new_ids.append(_commit_hole_chunk(tree, batch, req, plan, out_i))
            new_out.append(out_i)
            positions.append(plan.positions)
            continue
        if plan is None:
            new_ids.append(ids_i)
            new_out.append(out_i)
            positions.append(torch.arange(pre, pre + ext, dtype=torch.int64))
            record_recomputed(req, [(pre, pre + ext)])
            continue
        row = batch.req_to_token_pool.req_to_token[req.kv.req_pool_idx]
        for w in plan.row_writes:
            row[w.start : w.end] = w.slots.to(row.device, row.dtype)
        new_ids.append(ids_i[plan.keep])
        new_out.append(out_i[plan.keep.to(out_i.device)])
        positions.append(plan.positions)
        surplus.append(plan.surplus)
        m = plan.recomputed
        batch.extend_lens[i] = m
        batch.prefix_lens[i] = plan.seq_len - m
        batch.extend_logprob_start_lens[i] = m - plan.logprob_tail
        req.cached_tokens += plan.reused - pre
        tree.borrowed[req.kv.req_pool_idx] = list(plan.borrowed)
        record_recomputed(req, plan.missing)
        _count_chunk_request(tree, req, plan)
    freed = torch.cat(surplus) if surplus else None
    if freed is not None and freed.numel():
        tree.token_to_kv_pool_allocator.free(freed)
    batch.prefill_input_ids_cpu = torch.cat(new_ids)
    batch.out_cache_loc = torch.cat(new_out)
    batch.extend_num_tokens = int(sum(batch.extend_lens))
    setattr(batch, BATCH_ATTR, torch.cat(positions))


def _commit_hole_chunk(tree: HoleRadixCache, batch: Any, req: Any, chunk: HoleChunk, slots: torch.Tensor
                       ) -> torch.Tensor:
    """One extend of a hole request: its slots go to their real positions and the row is rewritten
    in position order (SGLang wrote it in virtual order). Returns the extend's token ids."""
    fill = holes_of(req).fill
    row = batch.req_to_token_pool.req_to_token[req.kv.req_pool_idx]
    n = len(req.full_untruncated_fill_ids)
    if fill.row is None:  # first extend: the reused spans, in place
        fill.row = torch.zeros(n, dtype=row.dtype, device=row.device)  # 0: SGLang's padding slot
        for g in fill.segments:
            if g.slots is not None:
                fill.row[g.start : g.end] = g.slots.to(row.device, row.dtype)
    fill.row[chunk.positions.to(row.device)] = slots.to(row.dtype)
    row[:n] = fill.row
    fill.computed += int(chunk.positions.numel())
    reused_beyond = [(g.start, g.end) for g in fill.segments if g.slots is not None and g.end > fill.prefix_len]
    # Never freed with the request's row: the tree's reused spans, and positions not computed yet.
    tree.borrowed[req.kv.req_pool_idx] = sorted(reused_beyond + list(chunk.uncomputed))
    record_recomputed(req, list(chunk.spans), continued=not chunk.first)
    if getattr(req, "retracted_stain", False):
        return _token_ids(req)[chunk.positions]  # a re-prefill after a retraction is not a new hole request
    if chunk.first:
        tree.count("hole_requests")
        tree.count("reused_tokens", fill.reused)
    tree.count("recomputed_tokens", int(chunk.positions.numel()))
    if chunk.last:
        tree.count("hole_spans_filled", sum(1 for _, e in spans_from_positions(fill.missing.tolist()) if e < n))
    return _token_ids(req)[chunk.positions]


def _token_ids(req: Any) -> torch.Tensor:
    ids = req.full_untruncated_fill_ids
    try:
        return torch.frombuffer(ids, dtype=torch.int64)
    except (TypeError, ValueError):
        return torch.tensor(list(ids), dtype=torch.int64)


def _count_chunk_request(tree: HoleRadixCache, req: Any, plan: ExtendPlan) -> None:
    tree.chunks.commit(req, plan)
    record_chunk_reuse(req, holes_of(req).chunk)
    tree.count("chunk_requests")
    tree.count("chunk_reused_tokens", plan.reused)
