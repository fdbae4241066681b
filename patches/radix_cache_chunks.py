"""Chunk mode of the ``holes`` radix cache: RAG document KV reused at any position.

A request whose ``kv_hints`` carry a ``sglang_holes.chunks`` action (validated at
entry, ``patches/tokenizer_manager.py``) runs in chunk mode:

* ``match_prefix`` reports no cached prefix and never reads the exact tree: chunk
  KV is approximate and must not mix with exact prefixes (nor ever be inserted into
  the tree: ``checkpoint`` stores chunks in the ``ChunkStore`` instead);
* ``admit`` (before ``prepare_for_extend`` allocates) looks up each chunk by content
  in the request's namespace (extra key, cache salt) and locks the hits, so
  allocation's eviction cannot take them;
* ``place`` (after it) copies each hit into the request's slots, K re-rotated by the
  position delta (``sglang_holes.chunks.kv_copy``), or borrows the entry's slots when the
  offset is unchanged; then the policy picks the tokens to recompute (``chunks.py``,
  ``deviation.py``), which become holes of the one segmented prefill;
* ``checkpoint`` hands the slots of chunks this request computed to the store (they
  stay in the request's row, locked, until it is released).

The store's slots count in the cache's sizes and compete with the trees' for
eviction (``HoleRadixCache.evict``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

import torch

from sglang_holes.cache.extend_plan import ExtendPlan, plan_extend
from sglang_holes.chunks.deviation import ProbeWeights, deviation_scores
from sglang_holes.chunks.hints import recompute_mask
from sglang_holes.chunks.kv_copy import copy_rerotated
from sglang_holes.chunks.placement import borrowed_writes, plan_chunk_placement
from sglang_holes.chunks.rope import RopeSpec
from sglang_holes.chunks.state import ChunkState
from sglang_holes.chunks.store import ChunkStore
from sglang_holes.hf_config import attention_dims
from sglang_holes.patches.request_holes import holes_of

logger = logging.getLogger("sglang_holes")


class ChunkReuse:
    """The chunk store of one ``HoleRadixCache`` and the chunk-mode steps (module docstring)."""

    def __init__(self, allocator: Any, rope: RopeSpec,
                 probe_loader: Callable[[], ProbeWeights] | None = None) -> None:
        self.store = ChunkStore()
        self.allocator = allocator
        self.rope = rope
        self._probe_loader = probe_loader
        self._probe: ProbeWeights | None = None

    def reset(self) -> None:
        """Forget every chunk (``flush_cache``: SGLang has already freed every slot)."""
        self.store = ChunkStore()

    # ----------------------------------------------------------------- admission

    def admit(self, req: Any, room: int) -> int:
        """Look up and lock the request's chunks; returns the tokens newly pinned.

        ``room``: slots the batch can still find beyond what it allocates; hits that
        would pin more are dropped (recomputed instead). No reuse for requests SGLang
        prefills in pieces (chunked prefill).
        """
        rec = holes_of(req)
        if rec.chunk is not None and req.prefix_len:
            return 0  # a later piece of a chunked prefill: keep what the earlier pieces stored
        self.release(req)
        hints = rec.chunk_hints
        ns = (req.extra_key, req.cache_salt)
        st = ChunkState(hints, ns, [None] * len(hints.chunks))
        rec.chunk = st
        ids = req.origin_input_ids
        whole = req.extend_end == len(req.full_untruncated_fill_ids) and not req.prefix_len
        if not hasattr(self.allocator.get_kvcache(), "k_buffer") or not whole:
            return 0
        pinned = 0
        for j, (s, e) in enumerate(hints.chunks):
            entry = self.store.lookup(ids[s:e], ns)
            if entry is None:
                continue
            extra = 0 if entry.lock_ref else len(entry)
            if pinned + extra > room:
                continue
            self.store.lock(entry)
            st.locked.append(entry)
            st.hits[j] = entry
            pinned += extra
        return pinned

    # ----------------------------------------------------------------- placement

    def place(self, req: Any, pool: Any, slots: torch.Tensor) -> ExtendPlan | None:
        """Plan a chunk request's extend after stock allocation (``slots``: its slots for positions
        ``0..n-1``); None when the store had none of its chunks.

        The re-rotating KV copies run here, before the plan is returned: the ``deviation``
        policy scores the placed KV. The row writes and lock changes wait for ``commit``.
        """
        st = holes_of(req).chunk
        if st is None or not any(e is not None for e in st.hits):
            return None
        n = slots.numel()
        slots_cpu = slots.to("cpu", torch.int64)
        placement = plan_chunk_placement(st.hints.chunks, st.hits, slots_cpu)
        for c in placement.copies:
            copy_rerotated(pool.k_buffer, pool.v_buffer, c.src, c.dst, c.delta, self.rope)
        keep = self._recompute(req, st, pool, placement.cached, n)
        start = _input_logprob_start(req, n)
        if start is not None:  # input logprobs need those positions' logits: recompute them
            keep[start:] = True
        return plan_extend(0, keep, slots, borrowed_writes(keep, placement.cached, slots_cpu),
                           0 if start is None else n - start)

    def _recompute(self, req: Any, st: ChunkState, pool: Any, cached: torch.Tensor, n: int) -> torch.Tensor:
        reused = [e is not None for e in st.hits]
        if st.hints.policy != "deviation":
            return recompute_mask(n, st.hints, reused)
        try:
            return recompute_mask(n, st.hints, reused, self._deviation(req, pool, cached))
        except Exception:  # validated at entry; never take the scheduler down over a score
            logger.exception("deviation probe failed; request %s recomputes its chunks", req.rid)
            return torch.ones(n, dtype=torch.bool)

    def commit(self, req: Any, plan: ExtendPlan) -> None:
        """Entries read through borrowed slots stay locked until release; copied ones are done."""
        st = holes_of(req).chunk
        borrowed = torch.zeros(plan.seq_len, dtype=torch.bool)
        for s, e in plan.borrowed:
            borrowed[s:e] = True
        for entry in st.locked:
            self.store.unlock(entry)
        st.locked = [entry for (s, e), entry in zip(st.hints.chunks, st.hits, strict=True)
                     if entry is not None and bool(borrowed[s:e].any())]
        for entry in st.locked:
            self.store.lock(entry)
        st.handled.update(j for j, e in enumerate(st.hits) if e is not None)
        st.reused_tokens = plan.reused

    def _deviation(self, req: Any, pool: Any, cached: torch.Tensor) -> torch.Tensor:
        if self._probe is None:
            if self._probe_loader is None:
                raise ValueError("the deviation policy is not available on this server")
            self._probe = self._probe_loader()
        ids = torch.tensor(req.origin_input_ids, dtype=torch.int64)
        full_k, full_v = self._probe.layer1_kv(ids)
        slots = cached.to(pool.k_buffer[1].device)
        return deviation_scores(full_k, full_v, pool.k_buffer[1][slots], pool.v_buffer[1][slots])

    def read(self, tokens: list[int], namespace: Hashable, layer: int, offset: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """K and V ``[len, kv_heads, head_dim]`` of a stored chunk at one layer, for inspection.

        With ``offset``, moved there through the placement path (``copy_rerotated`` into
        scratch slots, freed after). Returns ``(k, v, offset the entry was computed at)``.
        """
        entry = self.store.get(tokens, namespace)
        if entry is None:
            raise ValueError("this chunk is not in the chunk store")
        pool = self.allocator.get_kvcache()
        if not isinstance(layer, int) or not 0 <= layer < len(pool.k_buffer):
            raise ValueError(f"layer must be an integer in [0, {len(pool.k_buffer)})")
        kb, vb = pool.k_buffer[layer], pool.v_buffer[layer]
        if offset is None or offset == entry.offset:
            slots = entry.slots.to(kb.device)
            return kb[slots].cpu(), vb[slots].cpu(), entry.offset
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be an integer >= 0, got {offset!r}")
        scratch = self.allocator.alloc(len(entry))
        if scratch is None:
            raise ValueError("no free slots to place the chunk into")
        try:
            copy_rerotated([kb], [vb], entry.slots, scratch.to(torch.int64), offset - entry.offset, self.rope)
            return kb[scratch].cpu(), vb[scratch].cpu(), entry.offset
        finally:
            self.allocator.free(scratch)

    # ----------------------------------------------------------------- storing / release

    def store_computed(self, req: Any, row: torch.Tensor, up_to: int) -> list[tuple[int, int]]:
        """Hand chunks computed by this request (inside ``[0, up_to)``) to the store.

        Returns the row spans the store now owns (the caller must not free them); the
        new entries stay locked until the request is released (it may still read them).
        """
        st = holes_of(req).chunk
        if st is None:  # never admitted (e.g. aborted while waiting): nothing computed
            return []
        ids = req.origin_input_ids
        owned = []
        for j, (s, e) in enumerate(st.hints.chunks):
            if j in st.handled or e > up_to:
                continue
            st.handled.add(j)
            entry, rejected = self.store.insert(ids[s:e], row[s:e], s, st.namespace)
            if rejected.numel():
                continue  # already stored meanwhile (another request): ours is freed with the row
            self.store.lock(entry)
            st.locked.append(entry)
            owned.append((s, e))
        return owned

    def release(self, req: Any) -> None:
        """Unlock what the request holds (finish, abort, retraction)."""
        st = holes_of(req).chunk
        if st is not None:
            for entry in st.locked:
                self.store.unlock(entry)
            st.locked.clear()


def _input_logprob_start(req: Any, n: int) -> int | None:
    """First prompt position whose logits the request asked for (input logprobs), or None."""
    start = req.logprob_start_len
    if req.return_logprob and start is not None and 0 <= start < n:
        return start
    return None


def probe_loader_for(tp_worker: Any, config: dict[str, Any]) -> Callable[[], ProbeWeights]:
    """Builds the deviation probe from the served model's weights on first use (Hugging Face names)."""

    def load() -> ProbeWeights:
        model = tp_worker.model_runner.model
        heads, kv, hd = attention_dims(config)
        state: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            if not name.startswith(("model.embed_tokens.", "model.layers.0.", "model.layers.1.")):
                continue
            if ".qkv_proj." in name:
                q, k, v = p.detach().split([heads * hd, kv * hd, kv * hd], dim=0)
                for part, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    state[name.replace("qkv_proj", part)] = t
            elif ".gate_up_proj." in name:
                g, u = p.detach().chunk(2, dim=0)
                state[name.replace("gate_up_proj", "gate_proj")] = g
                state[name.replace("gate_up_proj", "up_proj")] = u
            else:
                state[name] = p.detach()
        return ProbeWeights.from_state(state, config)

    return load
