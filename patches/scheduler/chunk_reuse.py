"""Chunk mode of the ``holes`` radix cache: RAG document KV reused at any position.

A request whose ``kv_hints`` carry a ``sglang_holes.chunks`` action (validated at
entry, ``patches/serving/entry.py``) runs in chunk mode:

* ``match`` (from ``HoleRadixCache.match_prefix``, before SGLang admits the request) looks
  up each chunk by content in the request's namespace (extra key, cache salt), and plans
  the reuse (``chunks/placement.ChunkFill``): which positions read a stored chunk in place,
  which get a re-rotated copy, which the policy recomputes (``deviation`` scores the stored
  KV as it would be placed, ``query`` runs the probe over the request's computed tokens
  against it). SGLang is shown the in-place positions as the prefix and the
  rest as the extend (virtual order, ``patches/scheduler/request_holes.HoleFill``), so it budgets,
  splits into prefill pieces and allocates only those; its admission lock on the returned
  ``ChunkMatch`` pins the entries read.
* each extend (``patches/scheduler/extend.py``) copies its copied positions with K re-rotated
  by the position delta (``copy_in``) and computes the rest;
* chunk KV is approximate and never enters the exact tree: ``checkpoint`` hands chunks the
  request computed to the store (``store_computed``). The exact tree serves only the positions
  before the first chunk (a shared system prompt: exact KV), read in place when cached there and
  inserted once computed (``patches/scheduler/chunk_prefix.py``).

The store's slots count in the cache's sizes and compete with the trees' for
eviction (``HoleRadixCache.evict``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import torch

from sglang_holes.cache.node import Segment
from sglang_holes.chunks.deviation import deviation_scores
from sglang_holes.chunks.hints import DEFAULT_QUERY_LAYERS, SCORED, ChunkHints, Sink, recompute_mask, unscored_mask
from sglang_holes.chunks.kv_copy import copy_rerotated
from sglang_holes.chunks.llama_stack import LlamaStack
from sglang_holes.chunks.placement import ChunkFill, plan_chunk_fill
from sglang_holes.chunks.rope import RopeSpec, rerotate
from sglang_holes.chunks.state import ChunkState
from sglang_holes.chunks.store import ChunkEntry, ChunkStore
from sglang_holes.config import SINK_TOKENS
from sglang_holes.hf_config import attention_dims
from sglang_holes.patches.scheduler.request_holes import HoleFill, holes_of

logger = logging.getLogger("sglang_holes")


class Stored(NamedTuple):
    """``store_computed``'s result: the row spans the store now owns, and the tokens it dropped for them."""

    spans: list[tuple[int, int]]
    dropped_tokens: int


class Planned(NamedTuple):
    """``ChunkReuse._plan``'s result: the reuse (None: none), and the reused positions the attention
    sink rule made it recompute."""

    base: ChunkFill | None
    sink_recomputed: int = 0


class ChunkMatch:
    """``req.last_node`` of a chunk request that reuses KV: SGLang's admission lock on it
    (``HoleRadixCache.lock``) pins the store entries the request reads and, with a shared
    leading prefix read from the exact tree, that tree's ``prefix_node``."""

    __slots__ = ("entries", "lock_ref", "prefix_node")

    def __init__(self, entries: tuple[ChunkEntry, ...], prefix_node: Any = None) -> None:
        self.entries = entries
        self.lock_ref = 0
        self.prefix_node = prefix_node


class ChunkReuse:
    """The chunk store of one ``HoleRadixCache`` and the chunk-mode steps (module docstring)."""

    def __init__(self, allocator: Any, rope: RopeSpec,
                 probe_loader: Callable[[], LlamaStack] | None = None, store_tokens: int | None = None,
                 store_policy: str = "frequency", sink_tokens: int = SINK_TOKENS) -> None:
        if sink_tokens < 1:
            raise ValueError(f"sink_tokens must be >= 1, got {sink_tokens}")
        self.sink_tokens = sink_tokens
        self._store_settings = {"capacity": store_tokens, "policy": store_policy}
        self.store = ChunkStore(**self._store_settings)
        self.allocator = allocator
        self.rope = rope
        self._probe_loader = probe_loader
        self._probe: LlamaStack | None = None

    def reset(self) -> None:
        """Forget every chunk (``flush_cache``: SGLang has already freed every slot)."""
        self.store = ChunkStore(**self._store_settings)

    # ----------------------------------------------------------------- matching

    def match(self, req: Any, max_prefix: int, room: int, prefix: Segment | None = None,
              prefix_node: Any = None) -> HoleFill | None:
        """Plan a waiting chunk request's reuse; None: it reuses nothing (computes every position).

        ``max_prefix``: the most positions SGLang lets a match cover; ``room``: slots the pool
        can still give (free + evictable). A plan whose extend plus what it would pin exceeds
        ``room`` is not used this round (the request would otherwise wait for memory it cannot
        get). The chunk plan is kept while the request waits and the store returns the same
        entries. ``prefix``: the exact tree's KV of the leading non-chunk positions ``[0, P)``
        (a shared system prompt), pinned by ``prefix_node``; read in place (exact KV).
        """
        rec = holes_of(req)
        hints = rec.chunk_hints
        ns = (req.extra_key, req.cache_salt)
        ids = req.origin_input_ids
        n = len(req.full_untruncated_fill_ids)
        usable = hasattr(self.allocator.get_kvcache(), "k_buffer") and n == len(ids)  # retracted: prompt only
        hits = [self.store.get(ids[s:e], ns) if usable else None for s, e in hints.chunks]
        st = rec.chunk
        if st is None or st.locked or st.seeded or any(a is not b for a, b in zip(st.hits, hits, strict=True)):
            planned = self._plan(req, hints, hits, n)
            st = ChunkState(hints, ns, hits, planned.base, sink_recomputed=planned.sink_recomputed)
            rec.chunk = st
        plan = st.base
        if prefix is not None and usable and prefix.end < n:
            plan = (plan or ChunkFill.computing_all(n, prefix.slots.device)).with_prefix(prefix)
        else:
            prefix = prefix_node = None
        st.plan, st.exact_prefix, st.prefix_node = plan, prefix.end if prefix else 0, prefix_node
        if plan is None:
            return None
        entries = _distinct(hits)
        borrowed = int(plan.borrowed.sum())
        pin = sum(len(e) for e in entries if not e.lock_ref) + st.exact_prefix
        if borrowed > max_prefix or plan.order.numel() + pin > room:
            return None
        return HoleFill(0, borrowed, plan.segments(), ChunkMatch(entries, prefix_node), chunk=plan)

    def _plan(self, req: Any, hints: ChunkHints, hits: list[ChunkEntry | None], n: int) -> Planned:
        reused = [e is not None for e in hits]
        if not any(reused):
            return Planned(None)
        forced = _input_logprob_start(req, n)
        sink = self._sink(req.origin_input_ids, hints, hits)
        try:
            scores = self._scores(req, hints, hits, unscored_mask(n, hints, reused, forced, sink)) \
                if hints.policy in SCORED else None
            recompute = recompute_mask(n, hints, reused, scores, forced, sink)
        except Exception:  # validated at entry; never take the scheduler down over a score
            logger.exception("chunk reuse planning failed; request %s recomputes its chunks", req.rid)
            return Planned(None)
        if bool(recompute.all()):
            return Planned(None)
        without = unscored_mask(n, hints, reused, forced)
        sink_recomputed = int((recompute[: sink.tokens] & ~without[: sink.tokens]).sum())
        return Planned(plan_chunk_fill(hints.chunks, hits, recompute), sink_recomputed)

    def _sink(self, ids: list[int], hints: ChunkHints, hits: list[ChunkEntry | None]) -> Sink:
        """The sink rule of this prompt: a hit inside the sink is exact only where it was computed
        at this offset after these same tokens."""
        exact = tuple(e is not None and s < self.sink_tokens and e.exact_at(s, ids[:s])
                      for (s, _), e in zip(hints.chunks, hits, strict=True))
        return Sink(self.sink_tokens, exact)

    def _scores(self, req: Any, hints: ChunkHints, hits: list[ChunkEntry | None], computed: torch.Tensor
                ) -> torch.Tensor:
        """``[n]`` scores of a scored policy; ``computed``: the positions recomputed whatever the scores.

        ``deviation``: layer 1's full-context KV (the probe over every position) against the stored
        KV as placed. ``query``: attention mass that the computed positions from the end of the
        last reused chunk on (the question; all computed positions if none) pay to each key,
        through the first ``layers`` layers, computed against the placed KV: what the request's
        own prefill would attend to if nothing more were recomputed.
        """
        if self._probe is None:
            if self._probe_loader is None:
                raise ValueError(f"the {hints.policy} policy is not available on this server")
            self._probe = self._probe_loader()
        ids = torch.tensor(req.origin_input_ids, dtype=torch.int64)
        if hints.policy == "deviation":
            full = self._probe.run(ids, layers=2)
            return deviation_scores(full.k[1], full.v[1], *self._placed(hints, hits, 1, ids.numel()))
        last_end = max(e for (_, e), entry in zip(hints.chunks, hits, strict=True) if entry is not None)
        scored = computed.clone()
        scored[:last_end] = False
        if not bool(scored.any()):
            scored = computed

        def placed(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self._placed(hints, hits, layer, ids.numel())

        layers = min(hints.layers or DEFAULT_QUERY_LAYERS, self._probe.num_layers)  # explicit: checked at entry
        out = self._probe.run(ids, computed, placed, layers, scored)
        return out.mass

    def _placed(self, hints: ChunkHints, hits: list[ChunkEntry | None], layer: int, n: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """K (re-rotated) and V ``[n, kv_heads, head_dim]`` of the stored chunks as the request would
        place them at ``layer``, in the pool's dtype and device; rows outside reused chunks are zeros."""
        pool = self.allocator.get_kvcache()
        kb, vb = pool.k_buffer[layer], pool.v_buffer[layer]
        placed_k, placed_v = kb.new_zeros((n, *kb.shape[1:])), vb.new_zeros((n, *vb.shape[1:]))
        for (s, e), entry in zip(hints.chunks, hits, strict=True):
            if entry is None:
                continue
            slots = entry.slots.to(kb.device)
            k = kb[slots]
            delta = s - entry.offset
            placed_k[s:e] = (rerotate(k, delta, self.rope) if delta else k).to(placed_k)
            placed_v[s:e] = vb[slots].to(placed_v)
        return placed_k, placed_v

    # ----------------------------------------------------------------- locks and copies

    def lock(self, match: ChunkMatch) -> None:
        for entry in match.entries:
            self.store.lock(entry)
        match.lock_ref += 1

    def unlock(self, match: ChunkMatch) -> None:
        if match.lock_ref <= 0:
            raise RuntimeError("unlock of a chunk match that holds no lock (unlocked twice?)")
        match.lock_ref -= 1
        for entry in match.entries:
            self.store.unlock(entry)

    def borrowed_entries(self, req: Any) -> ChunkMatch:
        """The entries (and exact-tree prefix) a request whose prefill is complete still reads in
        place, until release."""
        st = holes_of(req).chunk
        plan = st.plan
        return ChunkMatch(_distinct([e for (s, end), e in zip(st.hints.chunks, st.hits, strict=True)
                                     if e is not None and bool(plan.borrowed[s:end].any())]), st.prefix_node)

    def copy_in(self, plan: ChunkFill, positions: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the stored KV of copied ``positions`` (int64) into slots ``dst``, K re-rotated."""
        delta = plan.delta[positions]  # host
        pool = self.allocator.get_kvcache()
        for d in delta.unique().tolist():
            at = (delta == d).nonzero().flatten()  # host indices only: nothing here syncs the device
            src = plan.src.index_select(0, positions[at].to(plan.src.device))
            copy_rerotated(pool.k_buffer, pool.v_buffer, src, dst.index_select(0, at.to(dst.device)), int(d),
                           self.rope)

    def committed(self, req: Any, reused: int) -> None:
        """A chunk request's first extend ran: its hits are reused (never stored again), recency refreshed."""
        st = holes_of(req).chunk
        for j, entry in enumerate(st.hits):
            if entry is not None:
                st.handled.add(j)
                self.store.record_use(entry.tokens, entry.namespace)
                self.store.lookup(entry.tokens, entry.namespace)
        st.reused_tokens = reused

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

    def store_computed(self, req: Any, row: torch.Tensor, up_to: int) -> Stored:
        """Offer chunks computed by this request (inside ``[0, up_to)``) to the store.

        The store's policy decides which it keeps (``ChunkStore.admission``), dropping entries to
        make room (their slots go back to the allocator here). Returns the row spans the store now
        owns (the caller must not free them) and the tokens dropped; the new entries stay locked
        until the request is released (it may still read them). A chunk not kept stays the
        request's own and is freed with its row.
        """
        st = holes_of(req).chunk
        if st is None:  # never admitted (e.g. aborted while waiting): nothing computed
            return Stored([], 0)
        ids = req.origin_input_ids
        owned, dropped = [], 0
        for j, (s, e) in enumerate(st.hints.chunks):
            if j in st.handled or e > up_to:
                continue
            st.handled.add(j)
            tokens = ids[s:e]
            self.store.record_use(tokens, st.namespace)
            if self.store.get(tokens, st.namespace) is None:
                decision = self.store.admission(tokens, st.namespace)
                if not decision.admit:
                    continue
                freed = self.store.drop(decision.victims)
                if freed.numel():
                    self.allocator.free(freed.to(getattr(self.allocator, "device", "cpu") or "cpu"))
                    dropped += int(freed.numel())
            lead = ids[:s] if s < self.sink_tokens else None  # may serve a later prompt's sink in place
            entry, rejected = self.store.insert(tokens, row[s:e], s, st.namespace, lead)
            if rejected.numel():
                continue  # already stored meanwhile (another request): ours is freed with the row
            self.store.lock(entry)
            st.locked.append(entry)
            owned.append((s, e))
        return Stored(owned, dropped)

    def release(self, req: Any) -> None:
        """Unlock what the request holds (finish, abort, retraction)."""
        rec = holes_of(req)
        if rec.chunk is not None:
            for entry in rec.chunk.locked:
                self.store.unlock(entry)
        rec.chunk = None


def _distinct(entries: list[ChunkEntry | None]) -> tuple[ChunkEntry, ...]:
    """The entries, each once (a chunk may repeat in a prompt), in order; None dropped."""
    return tuple({id(e): e for e in entries if e is not None}.values())


def _input_logprob_start(req: Any, n: int) -> int | None:
    """First prompt position whose logits the request asked for (input logprobs), or None."""
    start = req.logprob_start_len
    if req.return_logprob and start is not None and 0 <= start < n:
        return start
    return None


def probe_loader_for(tp_worker: Any, config: dict[str, Any]) -> Callable[[], LlamaStack]:
    """Builds the chunk probe (``LlamaStack``, every layer) from the served model's weights on first
    use: views of them under Hugging Face names, nothing copied (the model's dtype is kept)."""

    def load() -> LlamaStack:
        model = tp_worker.model_runner.model
        heads, kv, hd = attention_dims(config)
        state: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            if not name.startswith(("model.embed_tokens.", "model.layers.")):
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
        return LlamaStack.from_state(state, config, int(config["num_hidden_layers"]), dtype=None)

    return load
