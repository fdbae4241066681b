"""Radix cache backend ``holes``: SGLang's ``BasePrefixCache`` contract on top of ``HoleTree``.

Selected with ``--radix-cache-backend holes`` (registered through SGLang's radix-cache registry by
``patches/launch/plugin.py``, built by ``patches/scheduler/cache_factory.py``). Eviction policy:
SGLang's own ``--radix-eviction-policy`` (``HolesConfig.eviction_policy``): ``cost-aware`` (the
default with this cache: may punch interior holes where recompute is cheapest; its FLOP constants
come from the served model's config), ``priority-cost``, or SGLang's own ``lru``, ``lfu``, ``slru``,
``priority`` (leaves only, as SGLang evicts them).

What SGLang sees (``match_prefix``): without KV beyond a hole, the leading cached run as the
prefix, as stock SGLang. With KV beyond a hole, *virtual order* (``HoleFill``): every reused token
is shown as the prefix, so SGLang admits, splits into prefill pieces and allocates only the missing
positions, and its admission lock on the deepest matched node pins every reused span; the tree
owns only the leading run ``[0, P0)`` of the row (``cache_protected_len``). The ``prepare_for_extend``
hook (``patches/scheduler/extend.py``) then rewrites each prefill piece into real positions.
Hole batches need a hole-aware attention backend (the server's capabilities,
``patches/launch/capabilities.py``); without one, requests with holes take the stock path
(recompute from the first hole), which stays correct.

Requests with RAG document hints (``patches/scheduler/chunk_reuse.py``) read the exact tree only
for their leading non-document prefix (``patches/scheduler/chunk_prefix.py``: a shared system
prompt, read in place and inserted once computed); the rest of their reuse comes from the chunk
store, whose slots count in this cache's sizes and eviction.

Slot ownership follows ``HoleTree``: the tree owns what it stores; ``checkpoint`` inserts the
request's row and frees exactly the slots the tree rejected (the identity-aware
``rejected_slots``: a slot the tree already owns at that position is never freed); ``evict``
returns slots to SGLang's allocator. Which spans of a live request's row are not its own (reused
in place, not computed yet, handed to the store or the tree after a prefill piece) is recorded in
one place, ``self.ledger`` (``sglang_holes.cache.slot_ledger``): ``free_kv_row`` and ``checkpoint``
ask it, and ``patches/scheduler/pool_audit.py`` audits the whole pool against it. Locks:
``patches/scheduler/cache_locks.py``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    BasePrefixCache,
    EvictParams,
    EvictResult,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams

from sglang_holes.cache.eviction import make_policy
from sglang_holes.cache.leaf_policies import checkpoint_like_sglang
from sglang_holes.cache.namespaces import Namespaces
from sglang_holes.cache.recompute_cost import RecomputeCost
from sglang_holes.cache.slot_ledger import SlotLedger
from sglang_holes.cache.tree import HoleTree, Node, TreeHandle
from sglang_holes.config import HolesConfig
from sglang_holes.patches.launch.hooks import BACKEND_NAME
from sglang_holes.patches.scheduler.cache_locks import CacheLocks
from sglang_holes.patches.scheduler.chunk_prefix import match_chunk_prefix, seed_chunk_prefix
from sglang_holes.patches.scheduler.chunk_reuse import ChunkReuse
from sglang_holes.patches.scheduler.duel_feed import DuelFeed
from sglang_holes.patches.scheduler.request_holes import HoleFill, holes_of, stock_path_reason
from sglang_holes.patches.serving.metrics import COUNTERS, HoleMetrics

__all__ = ["BACKEND_NAME", "HoleRadixCache"]

NOT_DECIDED = "the cache was built without the server's capabilities (patches/launch/capabilities.py)"

logger = logging.getLogger("sglang_holes")


class HoleRadixCache(CacheLocks, DuelFeed, BasePrefixCache):
    """``HoleTree`` behind SGLang's prefix-cache interface (one tree per namespace)."""

    def __init__(self, params: CacheInitParams, config: HolesConfig | None = None,
                 recompute_cost: RecomputeCost | None = None, metrics: HoleMetrics | None = None,
                 chunks: ChunkReuse | None = None, no_hole_batches: str | None = NOT_DECIDED) -> None:
        self.disable = params.disable
        self.req_to_token_pool = params.req_to_token_pool
        self.token_to_kv_pool_allocator = params.token_to_kv_pool_allocator
        self.page_size = params.page_size
        self.is_eagle = params.is_eagle
        self.config = config if config is not None else HolesConfig()
        # Policies keep no per-tree state: every namespace's tree shares one.
        self.policy = make_policy(self.config.eviction_policy, recompute_cost, **dict(self.config.eviction_params))
        # Why hole batches cannot run here (Capabilities.no_hole_batches; None: they can). Requests
        # with KV beyond a hole then take the stock path; reported in /get_server_info.
        self.no_hole_batches = no_hole_batches
        # Benchmark baseline (mode prefix-only): reuse the leading cached run only.
        self.prefix_only = self.config.prefix_only
        self.device = torch.device(getattr(self.token_to_kv_pool_allocator, "device", "cpu") or "cpu")
        # The one record of which row spans of live requests are not their own (reused, pending,
        # handed to a holder): free_kv_row and checkpoint ask it; only its typed operations change it.
        self.ledger = SlotLedger()
        self.stats = dict.fromkeys(COUNTERS, 0)
        self.metrics = metrics
        # RAG document reuse (patches/scheduler/chunk_reuse.py); None: chunk hints are refused at entry.
        self.chunks = chunks
        self.reset()

    def count(self, key: str, amount: int = 1) -> None:
        """Add to one of ``stats`` (and its Prometheus counter with ``--enable-metrics``)."""
        self.stats[key] += amount
        if self.metrics is not None:
            self.metrics.inc(key, amount)

    # ------------------------------------------------------------------ namespaces

    def _tree(self, extra_key: Any = None, cache_salt: Any = None) -> HoleTree:
        """The tree of one namespace (created on first use): another extra key or cache salt never shares KV."""
        return self.namespaces.get((extra_key, cache_salt))

    def _tracked(self, node: Node) -> Any:
        """``namespaces.tracked`` for the tree holding ``node`` (a dropped tree's root: nothing to track)."""
        tree = self.namespaces.tree_of(node)
        return self.namespaces.tracked(tree) if tree is not None else contextlib.nullcontext()

    @staticmethod
    def _tokens(key: Any) -> list[int]:
        return list(key.raw_token_ids()[: len(key)]) if hasattr(key, "raw_token_ids") else list(key.token_ids)

    # ------------------------------------------------------------------ BasePrefixCache

    def reset(self) -> None:
        # cost-aware's decay, chosen by shadow caches of the pool's size; first, since a new duel moves the
        # policy back to its first decay and the trees' victim heaps are built with the policy's keys.
        self._start_duel()
        self.namespaces = Namespaces(self.page_size, self.policy)
        # inc_lock_ref's handles per node: dec_lock_ref releases one of these, never a forged one.
        self._ref_locks: dict[int, list[TreeHandle]] = {}
        self.root_node = self._tree().root
        self.ledger.reset()
        if self.chunks is not None:
            self.chunks.reset()
        self._empty = torch.empty((0,), dtype=torch.int64, device=self.device)

    def supports_prefix_sharing(self) -> bool:
        return not self.disable

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        """The match SGLang admits (virtual order when KV exists beyond a hole or in the chunk store).

        A failure while planning one request's reuse (tree walk, chunk placement, probes) never stops
        the scheduler: that request is logged with its rid, counted (``request_errors``) and matched
        with no reuse at all, which is always correct (it computes every position).
        """
        try:
            return self._match_prefix(params)
        except Exception:
            req = params.req
            logger.exception("sglang-holes: reuse planning failed for request %s; it is served without reuse",
                             getattr(req, "rid", None))
            self.count("request_errors")
            if req is not None:
                holes_of(req).fill = None
            return MatchResult(0, self.root_node, self.root_node, self.root_node)

    def _match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        key = params.key
        if self.disable or len(key) == 0:
            return MatchResult(0, self.root_node, self.root_node, self.root_node)
        tree = self.namespaces.find((getattr(key, "extra_key", None), getattr(key, "cache_salt", None)))
        rec = holes_of(params.req) if params.req is not None else None
        if rec is not None:
            rec.fill, rec.fallback = None, False  # a waiting request is matched every round
            if self.chunks is not None and rec.chunk_hints is not None:
                return self._match_chunks(params.req, len(key))
        if tree is None:  # nothing cached in this namespace (its tree is made by the first checkpoint)
            return MatchResult(0, self.root_node, self.root_node, self.root_node)
        result = tree.match(self._tokens(key))
        beyond = 0 if self.prefix_only else result.reused_tokens - result.cached_prefix_len
        if beyond <= 0 or rec is None:
            node = result.prefix_node
            return MatchResult(result.cached_prefix_len, node, node, node)
        if self.no_hole_batches is not None or stock_path_reason(params.req) is not None:
            rec.fallback = True  # counted when the request is scheduled
            node = result.prefix_node
            return MatchResult(result.cached_prefix_len, node, node, node)
        # KV beyond a hole. SGLang is shown every reused token as the prefix (virtual order,
        # HoleFill): it admits, splits and allocates only the missing tokens, and its admission
        # lock on the deepest cached node pins every reused span. The tree owns row [0, P0) only.
        node = result.handle.node
        rec.fill = HoleFill(result.cached_prefix_len, result.reused_tokens, tuple(result.segments), node)
        return MatchResult(result.reused_tokens, node, node, node, cache_protected_len=result.cached_prefix_len)

    def _match_chunks(self, req: Any, max_prefix: int) -> MatchResult:
        """Chunk mode reads the exact tree only for its leading non-chunk prefix (``chunk_prefix``); its
        other reuse comes from the chunk store, shown to SGLang in virtual order like a hole fill."""
        fill = None
        if self.no_hole_batches is None and stock_path_reason(req) in (None, "input logprobs"):
            room = self.token_to_kv_pool_allocator.available_size() + self.evictable_size()
            fill = self.chunks.match(req, max_prefix, room, *match_chunk_prefix(self, req))
        if fill is None:
            return MatchResult(0, self.root_node, self.root_node, self.root_node)
        holes_of(req).fill = fill
        return MatchResult(fill.reused, fill.node, fill.node, fill.node, cache_protected_len=0)

    def resolve_node_handle(self, node_handle: Any) -> Any:
        """For SGLang's ``dfs-weight`` ordering: a node outside the default namespace's tree (another
        namespace's, or a ``ChunkMatch``) counts at the root, so its request keeps its place in the queue."""
        node = node_handle
        while isinstance(node, Node) and node.parent is not None:
            node = node.parent
        return node_handle if node is self.root_node else self.root_node

    def prefix_device_indices(self, req: Any) -> torch.Tensor:
        """Slots of the prefix SGLang admitted: the leading cached run, or, for a hole request,
        every reused span in position order (its row is rewritten in position order right after)."""
        fill = holes_of(req).fill
        if fill is not None and req.prefix_len == fill.reused and req.last_node is fill.node:
            parts = [g.slots for g in fill.segments if g.slots is not None]
            out = torch.cat(parts).to(self.device)
            assert out.numel() == req.prefix_len == fill.reused, (out.numel(), req.prefix_len, fill.reused)
            return out
        parts, total = [], 0
        for n in self._path(req.last_node):
            if total >= req.prefix_len or n.slots is None:
                break
            parts.append(n.slots)
            total += len(n.key)
        out = torch.cat(parts).to(self.device) if parts else self._empty
        assert out.numel() >= req.prefix_len, (out.numel(), req.prefix_len)
        return out[: req.prefix_len]

    def free_kv_row(self, kv: Any, ranges: list[tuple[int, int]]) -> None:
        """Free row ranges, never a span the request does not own (``ledger``: reused, pending, handed)."""
        super().free_kv_row(kv, self.ledger.owned(kv.req_pool_idx, ranges))

    def on_release(self, req: Any, *, checkpointed: bool) -> None:
        rec = holes_of(req)
        self._feed_duel(req, rec, checkpointed)
        rec.fill = None
        if rec.chunk is not None and rec.chunk.seeded is not None:
            self.unlock(rec.chunk.seeded)
        if self.chunks is not None:
            self.chunks.release(req)
        if req.kv.req_pool_idx is not None:
            self.ledger.release(req.kv.req_pool_idx)

    @staticmethod
    def _path(node: Node) -> list[Node]:
        """Nodes from the root (excluded) down to ``node``."""
        nodes = []
        while node.parent is not None:
            nodes.append(node)
            node = node.parent
        nodes.reverse()
        return nodes

    def path_device_indices(self, node: Node) -> torch.Tensor:
        parts = []
        for n in self._path(node):
            if n.slots is None:
                raise RuntimeError("path to a locked request node has a hole")
            parts.append(n.slots)
        return torch.cat(parts).to(self.device) if parts else self._empty

    def checkpoint(self, req: Any, *, up_to: int, **_: Any) -> None:
        if self.disable:
            return
        kv = req.kv
        row = self.req_to_token_pool.req_to_token[kv.req_pool_idx]
        fill = holes_of(req).fill
        if fill is not None and fill.first_uncomputed() is not None:
            # Mid-fill (a prefill split into pieces, in virtual order): everything before the first
            # position not yet computed is present; the rest waits for later pieces.
            up_to = fill.first_uncomputed()
        if self.chunks is not None and holes_of(req).chunk_hints is not None:
            # Approximate KV stays out of the exact tree (the exact leading prefix goes in); computed
            # chunks go to the store.
            seed_chunk_prefix(self, req, row, up_to)
            stored = self.chunks.store_computed(req, row[:up_to].to(torch.int64), up_to)
            self.ledger.hand_over(kv.req_pool_idx, stored.spans)
            self.count("chunk_evicted_tokens", stored.dropped_tokens)
            return
        tokens = list(req.full_untruncated_fill_ids[:up_to])
        key_len = len(tokens) - len(tokens) % self.page_size
        tree = self._tree(req.extra_key, req.cache_salt)
        # Slot ids stay on the row's device (no device->host sync on the scheduler thread); which of
        # them are the tree's is known here: the protected prefix and the ledger's spans.
        owned = torch.zeros(key_len, dtype=torch.bool)
        owned[min(kv.cache_protected_len, key_len) :] = True
        for s, e in self.ledger.not_owned(kv.req_pool_idx):
            owned[s:e] = False
        priority = req.priority or 0
        with self.namespaces.tracked(tree):
            result = checkpoint_like_sglang(tree, tokens[:key_len], row[:key_len].to(torch.int64), owned,
                                            prompt_len=len(req.origin_input_ids), priority=priority,
                                            inserted_len=kv.cache_inserted_len)
        kv.cache_inserted_len = max(kv.cache_inserted_len, key_len)
        if result.rejected_slots.numel():
            # Duplicates of KV the tree already holds; the row is repointed below.
            self.token_to_kv_pool_allocator.free(result.rejected_slots.to(row.device, dtype=row.dtype))
        path = self.path_device_indices(result.handle.node)
        assert path.numel() == key_len, (path.numel(), key_len)
        start = kv.cache_protected_len
        self.req_to_token_pool.write((kv.req_pool_idx, slice(start, key_len)), path[start:].to(row.dtype))
        kv.cache_protected_len = key_len
        if fill is not None:
            if fill.row is not None:
                fill.row[:key_len] = path.to(fill.row.device, fill.row.dtype)
            if fill.order is None or fill.computed < fill.order.numel():
                if key_len <= fill.node.end:
                    return  # the admission lock on the deeper node still pins every reused span
            else:
                holes_of(req).fill = None  # the whole prompt is in the tree
        self.unlock(req.lock)
        req.lock = self.lock(result.handle.node)
        req.last_node = result.handle.node

    def _holders(self) -> list[Any]:
        """Everything that owns slots: each namespace's tree, and the chunk store."""
        out: list[Any] = self.namespaces.trees()
        if self.chunks is not None:
            out.append(self.chunks.store)
        return out

    def evict(self, params: EvictParams) -> EvictResult:
        """One rule for prefixes and chunks: the holder (a namespace's tree, or the chunk store)
        with the most evictable tokens gives first, by its own order (tree: its eviction policy; store: its
        store policy)."""
        want = params.num_tokens
        freed = 0
        for tree in sorted(self._holders(), key=lambda t: -t.evictable_size):
            if freed >= want:
                break
            n = min(want - freed, tree.evictable_size)
            if n > 0:
                with self.namespaces.tracked(tree) if tree is not self._store() else contextlib.nullcontext():
                    slots = tree.evict(n)
                self.token_to_kv_pool_allocator.free(slots.to(self.device))
                freed += slots.numel()
                if self.chunks is not None and tree is self.chunks.store:
                    self.count("chunk_evicted_tokens", slots.numel())
        return EvictResult(num_tokens_evicted=freed)

    def evict_span(self, input_ids: list[int], start: int, end: int, extra_key: Any = None,
                   cache_salt: Any = None) -> int:
        """Drop the KV of positions ``[start, end)`` of a cached prompt; return how many slots were freed.

        With ``page_size > 1`` the span grows to whole pages (a page is cached whole or not at all).

        Raises ``ValueError`` (cache unchanged) for a prompt not in the cache, a span that is
        empty, reversed or out of range, or KV locked by a running request.
        """
        if not isinstance(start, int) or not isinstance(end, int):
            raise ValueError("start and end must be integers")
        tree = self.namespaces.find((extra_key, cache_salt))
        if tree is None:
            raise ValueError("this prompt is not in the cache")
        if not 0 <= start < end <= len(input_ids):  # before page rounding: never clamp a bad span silently
            raise ValueError(f"span [{start}, {end}) is empty, reversed or outside [0, {len(input_ids)})")
        P = self.page_size
        if P > 1:  # KV lives in whole pages: a partly evicted page is a hole of the whole page
            start, end = start // P * P, min(-(-end // P) * P, len(input_ids) // P * P)
        with self.namespaces.tracked(tree):
            freed = tree.evict_span(list(input_ids), start, end)
        if freed.numel():
            self.token_to_kv_pool_allocator.free(freed.to(self.device))
        return int(freed.numel())

    def _store(self) -> Any:
        return self.chunks.store if self.chunks is not None else None

    def evictable_size(self) -> int:
        """Running totals (``Namespaces``) plus the chunk store: O(1) however many namespaces."""
        store = self._store()
        return self.namespaces.evictable_size + (store.evictable_size if store is not None else 0)

    def full_evictable_size(self) -> int:
        return self.evictable_size()

    def protected_size(self) -> int:
        store = self._store()
        return self.namespaces.protected_size + (store.protected_size if store is not None else 0)

    def full_protected_size(self) -> int:
        return self.protected_size()

    def total_size(self) -> int:
        return self.evictable_size() + self.protected_size()

    def all_values_flatten(self) -> torch.Tensor:
        parts = [t.owned_slots() for t in self._holders()]
        return torch.cat(parts) if parts else self._empty

    def pretty_print(self) -> None:
        for ns, tree in self.namespaces.items():
            print(f"namespace {ns}: {len(tree.nodes())} nodes, {tree.total_size} tokens "
                  f"({tree.evictable_size} evictable, {tree.protected_size} locked)")

    def check_integrity(self) -> None:
        """Every tree's (the decay duel's shadows too), the chunk store's and the ledger's integrity, and no slot
        owned twice by holders (the whole pool, live requests included, is audited by
        ``patches/scheduler/pool_audit.py``)."""
        self.namespaces.check_integrity()
        if self.duel is not None:
            self.duel.check_integrity()
        self.ledger.check_integrity()
        if self.chunks is not None:
            self.chunks.store.check_integrity()
        owned = self.all_values_flatten()
        assert owned.unique().numel() == owned.numel(), "a slot is owned by two namespaces (or tree and store)"
