"""Extend batches with holes: ``ScheduleBatch.prepare_for_extend`` and ``ForwardBatch.init_new`` hooks.

A request whose cached path has holes (``HoleRadixCache.match_prefix`` attached
``req.holes_match``) is admitted by SGLang as if only its leading cached run
``[0, P0)`` were cached: stock ``prepare_for_extend`` allocates ``n - P0`` new slots
and writes ``row[P0:n]`` with them. The AFTER hook then turns it into a hole request:

* for every reused span ``[s, e)`` beyond ``P0``: ``row[s:e]`` = the tree's slots
  (borrowed: locked by the admission lock, owned by the tree) and the surplus new
  slots allocated there are freed;
* ``input_ids`` / ``out_cache_loc`` keep only the missing tokens (holes and tail), in
  position order; ``extend_lens = m``, ``prefix_lens = n - m`` (a virtual prefix that
  keeps ``seq = prefix + extend``), ``seq_lens = n``;
* ``batch.hole_positions`` holds every query's original position (stock requests:
  ``arange(prefix, seq)``) and the ForwardBatch hook hands it to the model as
  ``positions`` (RoPE, and the attention backend's ``HolePlan``);
* ``req.cached_tokens`` counts every reused token, not just ``P0``.

Chunk-mode requests (RAG, ``patches/chunk_cache.py``) take the same route: a BEFORE
hook looks up and locks their chunks before allocation, and the AFTER hook's
``ChunkReuse.place`` decides which positions are reused (copied re-rotated into the
new slots, or borrowed from the store) and which are recomputed.

Requests the hook does not cover take SGLang's stock path (recompute from the first
hole; correct output) and are counted as fallbacks: chunked prefill, multimodal
inputs, input embeddings, positional overrides, input logprobs.
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_holes.patches.chunk_cache import Placement
from sglang_holes.patches.chunk_hints import chunk_hints_of
from sglang_holes.patches.meta_info import record_chunk_reuse, record_recomputed
from sglang_holes.plan import spans_from_positions

PREPARE = "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend"
INIT_NEW = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"


def _fallback_reason(req: Any) -> str | None:
    if req.extend_end != len(req.full_untruncated_fill_ids):
        return "chunked"
    if req.multimodal_inputs is not None or req.input_embeds is not None:
        return "multimodal"
    if getattr(req, "positional_embed_overrides", None) is not None:
        return "positional overrides"
    if req.return_logprob and req.logprob_start_len not in (-1, None) \
            and req.logprob_start_len < len(req.origin_input_ids):
        return "input logprobs"
    return None


def _before_prepare_for_extend(batch: Any, *_: Any, **__: Any) -> None:
    """Chunk requests look up and lock their chunks before allocation can evict them."""
    from sglang_holes.patches.radix_cache import HoleRadixCache

    tree = batch.tree_cache
    if not isinstance(tree, HoleRadixCache) or tree.chunks is None or batch.is_dllm():
        return
    chunk_reqs = [r for r in batch.reqs if chunk_hints_of(r) is not None]
    if not chunk_reqs:
        return
    # Admission budgeted every extend token; pinning hits must leave that much allocatable.
    need = sum(r.extend_end - r.prefix_len for r in batch.reqs)
    room = tree.token_to_kv_pool_allocator.available_size() + tree.evictable_size() - need
    for req in chunk_reqs:
        room -= tree.chunks.admit(req, max(room, 0))


def _hole_placement(p0: int, segments: list, row: torch.Tensor, out_i: torch.Tensor, ext: int) -> Placement:
    """Point ``row`` at the tree's slots for every reused span beyond ``p0`` (borrowed)."""
    keep = torch.ones(ext, dtype=torch.bool)
    borrowed = []
    for s, e, slots in segments:
        if slots is None or e <= p0:
            continue
        keep[s - p0 : e - p0] = False
        row[s:e] = slots.to(row.device, row.dtype)
        borrowed.append((s, e))
    return Placement(keep, borrowed, out_i[~keep.to(out_i.device)])


def _after_prepare_for_extend(result: Any, batch: Any, *_: Any, **__: Any) -> Any:
    from sglang_holes.patches.radix_cache import HoleRadixCache

    batch.hole_positions = None
    tree = batch.tree_cache
    if not isinstance(tree, HoleRadixCache) or batch.is_dllm():
        return result
    reqs = batch.reqs
    plans: list[tuple[int, list] | str | None] = []
    for req in reqs:
        match = getattr(req, "holes_match", None)
        req.holes_match = None
        if getattr(req, "holes_fallback", False):  # no room to pin its spans (see match_prefix)
            req.holes_fallback = False
            tree.count("fallbacks")
        if getattr(req, "holes_chunk", None) is not None and tree.chunks is not None:
            plans.append("chunks")
            continue
        if match is None:
            plans.append(None)
            continue
        p0, segments = match
        reason = _fallback_reason(req) if tree.hole_extend else "attention backend"
        if reason is not None or req.prefix_len != p0:
            tree.count("fallbacks")
            plans.append(None)
            continue
        plans.append((p0, segments))
    if not any(plans):
        for i, req in enumerate(reqs):
            pre = batch.prefix_lens[i]
            record_recomputed(req, [(pre, pre + batch.extend_lens[i])])
        return result

    ids_cpu = batch.prefill_input_ids_cpu
    out = batch.out_cache_loc
    row_table = batch.req_to_token_pool.req_to_token
    new_ids, new_out, positions, surplus = [], [], [], []
    offset = 0
    for i, (req, plan) in enumerate(zip(reqs, plans, strict=True)):
        ext = batch.extend_lens[i]
        pre = batch.prefix_lens[i]
        ids_i = ids_cpu[offset : offset + ext]
        out_i = out[offset : offset + ext]
        offset += ext
        row = row_table[req.kv.req_pool_idx]
        placed = None
        if plan == "chunks":
            placed = tree.chunks.place(req, tree.token_to_kv_pool_allocator.get_kvcache(), row, out_i)
            record_chunk_reuse(req, req.holes_chunk)
        elif plan is not None:
            placed = _hole_placement(plan[0], plan[1], row, out_i, ext)
        if placed is None:
            new_ids.append(ids_i)
            new_out.append(out_i)
            positions.append(torch.arange(pre, pre + ext, dtype=torch.int64))
            record_recomputed(req, [(pre, pre + ext)])
            continue
        n = pre + ext
        keep = placed.keep
        surplus.append(placed.surplus)
        pos_i = torch.arange(pre, n, dtype=torch.int64)[keep]
        missing = spans_from_positions(pos_i.tolist())  # holes and the uncached tail (last token included)
        m = pos_i.numel()
        new_ids.append(ids_i[keep])
        new_out.append(out_i[keep.to(out_i.device)])
        positions.append(pos_i)
        batch.extend_lens[i] = m
        batch.prefix_lens[i] = n - m
        batch.extend_logprob_start_lens[i] = m - placed.logprob_tail
        reused = n - m
        req.cached_tokens += reused - pre
        tree.borrowed[req.kv.req_pool_idx] = placed.borrowed
        record_recomputed(req, missing)
        if plan == "chunks":
            tree.count("chunk_requests")
            tree.count("chunk_reused_tokens", reused)
        else:
            tree.count("hole_requests")
            tree.count("hole_spans_filled", sum(1 for s, e in missing if e < n))
            tree.count("reused_tokens", reused)
            tree.count("recomputed_tokens", m)
    if surplus:
        freed = torch.cat(surplus)
        if freed.numel():
            tree.token_to_kv_pool_allocator.free(freed)
    batch.prefill_input_ids_cpu = torch.cat(new_ids)
    batch.out_cache_loc = torch.cat(new_out)
    batch.extend_num_tokens = int(sum(batch.extend_lens))
    batch.hole_positions = torch.cat(positions)
    return result


def _after_init_new(ret: Any, cls: Any, batch: Any, *_: Any, **__: Any) -> Any:
    """Queries of a hole batch run at their original positions (RoPE and attention).

    Only the ``positions`` field is set: a ForwardBatch may be copied field by field
    on its way to the model, so the attention backend derives its ``HolePlan`` from
    ``positions`` itself (``patches/attention_torch_native.py``).
    """
    positions = getattr(batch, "hole_positions", None)
    if positions is not None and ret.forward_mode.is_extend():
        ret.positions = positions.to(ret.seq_lens.device)
    return ret


def register() -> None:
    HookRegistry.register(PREPARE, _before_prepare_for_extend, HookType.BEFORE)
    HookRegistry.register(PREPARE, _after_prepare_for_extend, HookType.AFTER)
    HookRegistry.register(INIT_NEW, _after_init_new, HookType.AFTER)
