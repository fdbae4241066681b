"""HoleTree: a radix tree over token ids whose nodes may lose their KV while their
descendants keep theirs ("holes"), with matching through holes and pluggable eviction.

Units: tokens and positions are token counts; with ``page_size = P > 1`` every node key
is a whole number of pages, keys are compared page by page, and a sequence's trailing
partial page is never cached. Spans are half-open ``[start, end)`` positions.

Ownership: a KV slot belongs to exactly one of the free list, the tree, or a caller.
``insert`` takes the slots it stores and reports the others as ``rejected_slots`` (the
caller frees those); ``evict``/``evict_span`` return the slots they free (the caller
returns them to its allocator). The tree never frees anything itself.

Eviction policies live in ``sglang_holes.cache.eviction``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sglang_holes.cache.eviction import EvictionPolicy
from sglang_holes.cache.leaf_policies import lru_leaf
from sglang_holes.cache.node import (
    NO_STATS,
    InsertResult,
    InsertStats,
    MatchResult,
    Node,
    Segment,
    TreeHandle,
    _as_slots,
    _as_tokens,
    common_len,
)
from sglang_holes.cache.tree_audit import audit
from sglang_holes.cache.victim_index import ScanIndex

__all__ = ["HoleTree", "InsertResult", "MatchResult", "Node", "TreeHandle"]

class HoleTree:
    """Radix tree with holes. See the module docstring for units and ownership.

    Args:
        page_size: tokens per page (keys compared by page; partial pages never cached).
        policy: an ``EvictionPolicy`` (``sglang_holes.cache.eviction.make_policy(name)``);
            default ``lru_leaf()`` (leaves only, least recently used first).
            ``CostAware`` evicts the cheapest expected recompute per freed slot and may
            punch interior holes.
        reference_search: find victims by scanning the whole tree (``ScanIndex``, the reference
            the policy's incremental index is tested against) instead of the policy's own index.
    """

    def __init__(self, page_size: int = 1, policy: EvictionPolicy | None = None, reference_search: bool = False):
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        if policy is not None and not all(callable(getattr(policy, f, None)) for f in ("index", "key", "hit")):
            raise TypeError(f"policy must be an EvictionPolicy (make_policy(name)), got {policy!r}")
        self.page_size = page_size
        self.policy: EvictionPolicy = policy if policy is not None else lru_leaf()
        self.root = Node((), 0, torch.zeros(0, dtype=torch.int64), None)
        self.root.lock_ref = 1  # never evicted, never removed
        self.node_count = 0  # nodes below the root
        self._serial = 0
        self.now = 0  # logical clock: one tick per match or insert
        # SGLang stamps a node it creates inside an operation after the nodes that operation walked
        # (it reads its clock again): sub-stamps of the current tick keep that order for its policies.
        self._sub = 0
        self.evictable_size = 0  # cached tokens in unlocked nodes
        self.protected_size = 0  # cached tokens in locked nodes
        self.index = ScanIndex(self.policy, self) if reference_search else self.policy.index(self)

    # ------------------------------------------------------------------ helpers

    def _tick(self) -> int:
        self.now += 1
        self._sub = 0
        return self.now

    def _stamp(self) -> float:
        """A node created now, after everything this operation stamped before (``sg_access``)."""
        self._sub += 1
        return self.now + min(self._sub, 1023) / 1024  # never into the next tick

    def _child_key(self, tokens: tuple[int, ...], pos: int) -> tuple[int, ...]:
        return tokens[pos : pos + self.page_size]

    def _new_node(self, key: tuple[int, ...], start: int, slots: torch.Tensor | None, parent: Node) -> Node:
        node = Node(key, start, slots, parent)
        self._serial += 1
        node.serial = self._serial
        self.node_count += 1
        return node

    def _kv_changed(self, node: Node, before: bool) -> None:
        """``node`` gained or lost KV; ``before``: whether its subtree held KV. Carries the change up the
        ``cached_below`` counts, and hands the index a cached ancestor that became a leaf of the cached set."""
        after = node.holds_kv_below
        while before != after and node.parent is not None:
            parent = node.parent
            before = parent.holds_kv_below
            parent.cached_below += 1 if after else -1
            if parent.cached_below == 0:
                self.index.update(parent)
            node, after = parent, parent.holds_kv_below

    def _split(self, node: Node, at: int) -> Node:
        """Split ``node`` after ``at`` tokens; returns the new upper part (node keeps the rest)."""
        parent = node.parent
        assert parent is not None and 0 < at < len(node.key) and at % self.page_size == 0
        upper = self._new_node(node.key[:at], node.start, None if node.slots is None else node.slots[:at], parent)
        upper.lock_ref, upper.hits, upper.last_access = node.lock_ref, node.hits, node.last_access
        upper.created, upper.log_crf, upper.cached_below = node.created, node.log_crf, int(node.holds_kv_below)
        # SGLang's split: the new upper node inherits hits and priority and is stamped now.
        upper.sg_hits, upper.priority, upper.sg_access = node.sg_hits, node.priority, self._stamp()
        parent.children[self._child_key(node.key, 0)] = upper
        node.key = node.key[at:]
        node.start += at
        node.slots = None if node.slots is None else node.slots[at:]
        node.parent = upper
        upper.children[self._child_key(node.key, 0)] = node
        self.index.update(upper)
        self.index.update(node)  # it starts later now
        return upper

    def _walk(self, tokens: tuple[int, ...], split_end: bool = True,
              stamp: float | None = None) -> tuple[list[Node], int]:
        """Nodes matching ``tokens`` from the root (whole pages) and the matched length.

        If the match ends inside a node: with ``split_end`` that node is split and its
        upper part ends the path, its lower part (the node itself) stamped ``sg_access = stamp`` (default
        ``now``) as SGLang stamps a node before it splits it; without, the node ends the path (partially
        matched).
        """
        path: list[Node] = []
        node, pos = self.root, 0
        while pos + self.page_size <= len(tokens):
            child = node.children.get(self._child_key(tokens, pos))
            if child is None:
                break
            n = common_len(child.key, tokens, pos, self.page_size)
            if n < len(child.key):
                if n > 0:
                    if split_end:
                        child.sg_access = self.now if stamp is None else stamp
                    path.append(self._split(child, n) if split_end else child)
                    pos += n
                break
            path.append(child)
            pos += n
            node = child
        return path, pos

    def _add_size(self, node: Node, sign: int) -> None:
        if node.slots is None or node is self.root:
            return
        if node.lock_ref > 0:
            self.protected_size += sign * len(node.key)
        else:
            self.evictable_size += sign * len(node.key)

    def _prune(self, node: Node) -> None:
        """Remove ``node`` and its ancestors while they are unlocked holes without cached descendants."""
        while node is not self.root and node.slots is None and node.lock_ref == 0 and not node.children:
            parent = node.parent
            assert parent is not None
            del parent.children[self._child_key(node.key, 0)]
            node.parent = None
            self.node_count -= 1
            node = parent

    # ------------------------------------------------------------------ public API

    def match(self, tokens: Sequence[int]) -> MatchResult:
        """Longest path matching ``tokens``, walking through holes.

        Internal updates (the only mutations): a node the match ends inside is split at
        the boundary, and the matched nodes' access statistics (hit count, last access)
        are updated. No KV is added, freed, locked or evicted.
        """
        toks = _as_tokens(tokens)
        now = self._tick()
        path, _ = self._walk(toks)
        segments: list[Segment] = []
        handle_node = prefix_node = self.root
        in_prefix = True
        for node in path:
            node.hits += 1
            node.last_access, node.sg_access = now, max(node.sg_access, now)  # a split upper keeps its stamp
            self.policy.hit(node, now)
            self.index.update(node)
            if segments and segments[-1].cached == (node.slots is not None):
                last = segments[-1]
                slots = None if last.slots is None else torch.cat([last.slots, node.slots])
                segments[-1] = Segment(last.start, node.end, slots)
            else:
                segments.append(Segment(node.start, node.end, node.slots))
            if node.slots is not None:
                handle_node = node
            in_prefix = in_prefix and node.slots is not None
            if in_prefix:
                prefix_node = node
        end = path[-1].end if path else 0
        if end < len(toks):
            if segments and not segments[-1].cached:
                segments[-1] = Segment(segments[-1].start, len(toks), None)
            else:
                segments.append(Segment(end, len(toks), None))
        missing = [(g.start, g.end) for g in segments if not g.cached]
        reused = sum(g.end - g.start for g in segments if g.cached)
        prefix = segments[0].end if segments and segments[0].cached else 0
        return MatchResult(segments, missing, reused, prefix, TreeHandle(handle_node), prefix_node)

    def insert(self, tokens: Sequence[int], slots: torch.Tensor | Sequence[int],
               owned: torch.Tensor | None = None, stats: InsertStats = NO_STATS) -> InsertResult:
        """Store ``slots`` (one per token, any device) for ``tokens``: fill holes, add new nodes.

        ``stats``: the inserting request's priority and how many of these tokens it inserted before,
        for SGLang's per-node statistics (a node counts a hit when it ends past ``inserted_len``).

        Where the tree already holds KV, a given slot is rejected unless it is the tree's own.
        Which given slots are the tree's: ``owned`` (bool ``[len(tokens)]`` on the host, True
        where the slot is the caller's own, never the tree's), or, without it, by comparing
        slot ids (identity-aware; on a GPU that comparison syncs the device, which ``owned``
        avoids). The trailing partial page (page_size > 1) is rejected. Raises
        ``TypeError``/``ValueError`` on bad input, with the tree unchanged.
        """
        toks = _as_tokens(tokens)
        given = _as_slots(slots, len(toks))
        if owned is not None and (owned.dtype != torch.bool or owned.shape != (len(toks),)):
            raise ValueError(f"owned must be a bool tensor of shape ({len(toks)},)")
        n = len(toks) - len(toks) % self.page_size
        self._tick()
        path, _ = self._walk(toks[:n])
        last = path[-1] if path else self.root
        if owned is not None and not all(bool(owned[g.start : g.end].all()) for g in
                                         [*(x for x in path if x.slots is None), Segment(last.end, n, None)]):
            raise ValueError("a hole or a new node would take a slot the caller does not own")
        rejected = [given[n:]]
        now = self.now
        for node in path:
            part = given[node.start : node.end]
            node.last_access, node.sg_access = now, max(node.sg_access, now)  # a split upper keeps its stamp
            node.priority = max(node.priority, stats.priority)
            node.sg_hits += node.end > stats.inserted_len
            if node.slots is None:
                before = node.holds_kv_below
                node.slots = part.clone()
                self._add_size(node, +1)
                self._kv_changed(node, before)
            elif owned is None:
                rejected.append(part[part != node.slots])
            else:
                mine = owned[node.start : node.end].nonzero().flatten()
                rejected.append(part.index_select(0, mine.to(part.device)))
            self.index.update(node)
        pos = last.end
        if pos < n:
            new = self._new_node(toks[pos:n], pos, given[pos:n].clone(), last)
            new.last_access, new.created, new.hits = now, now, 1  # computed for a request: used once
            new.sg_access, new.priority, new.sg_hits = self._stamp(), stats.priority, int(n > stats.inserted_len)
            self.policy.hit(new, now)
            last.children[self._child_key(new.key, 0)] = new
            self._add_size(new, +1)
            self._kv_changed(new, False)
            self.index.update(new)
            last = new
        return InsertResult(torch.cat(rejected), TreeHandle(last))

    def touch(self, tokens: Sequence[int], stats: InsertStats | None = None) -> None:
        """Stamp the path of ``tokens`` as an SGLang insert of them would, without KV: ``sg_access``, and
        with ``stats`` priority and hits (SGLang's re-insert of a request's prompt one priority up at its
        checkpoint). Splits at the end of ``tokens`` (whole pages); no KV changes."""
        toks = _as_tokens(tokens)
        # Part of the operation that just inserted (no tick of the clock cost-aware reads), but later
        # within it, as SGLang reads its clock again.
        now = self._stamp()
        path, _ = self._walk(toks[: len(toks) - len(toks) % self.page_size], stamp=now)
        for node in path:
            node.sg_access = max(node.sg_access, now)
            if stats is not None:
                node.priority = max(node.priority, stats.priority)
                node.sg_hits += node.end > stats.inserted_len
            self.index.update(node)

    def lock(self, handle: TreeHandle) -> None:
        """Pin the handle's node and all its ancestors (nested locks count)."""
        node: Node | None = handle.node
        if node is not self.root and node.parent is None:
            raise ValueError("handle refers to a node no longer in the tree")
        while node is not None and node is not self.root:
            if node.lock_ref == 0:
                self._add_size(node, -1)
                node.lock_ref += 1
                self._add_size(node, +1)
            else:
                node.lock_ref += 1
            node = node.parent
        handle.locks += 1

    def unlock(self, handle: TreeHandle) -> None:
        """Undo one ``lock(handle)``. Raises ``ValueError`` if this handle holds no lock."""
        if handle.locks <= 0:
            raise ValueError("unlock of a handle that is not locked (unlocked twice?)")
        handle.locks -= 1
        node: Node | None = handle.node
        while node is not None and node is not self.root:
            if node.lock_ref == 1:
                self._add_size(node, -1)
                node.lock_ref -= 1
                self._add_size(node, +1)
                self.index.update(node)
            else:
                node.lock_ref -= 1
            parent = node.parent
            if node.lock_ref == 0 and node.slots is None and not node.children:
                self._prune(node)
            node = parent

    def evict(self, num_tokens: int) -> torch.Tensor:
        """Free at least ``num_tokens`` slots by the configured policy and return them.

        Raises ``ValueError`` (tree unchanged) if fewer than ``num_tokens`` are evictable.
        """
        if num_tokens < 0:
            raise ValueError("num_tokens must be >= 0")
        if num_tokens > self.evictable_size:
            raise ValueError(f"cannot evict {num_tokens} tokens: only {self.evictable_size} are evictable "
                             f"({self.protected_size} locked)")
        freed: list[torch.Tensor] = []
        remaining, P = num_tokens, self.page_size
        while remaining > 0:
            node = self.index.pop()
            assert node is not None, "evictable_size counts KV no policy can reach"
            take = -(-remaining // P) * P
            if self.policy.partial and take < len(node.key):
                node = self._split(node, take)  # evict the head; `node` now names it
            freed.append(self._drop_kv(node))
            remaining -= freed[-1].numel()
        return torch.cat(freed) if freed else torch.zeros(0, dtype=torch.int64)

    def _drop_kv(self, node: Node) -> torch.Tensor:
        assert node.slots is not None and node.lock_ref == 0 and node is not self.root
        slots = node.slots
        self._add_size(node, -1)
        node.slots = None
        self._kv_changed(node, True)
        if not node.children:
            self._prune(node)
        return slots

    def evict_span(self, tokens: Sequence[int], start: int, end: int) -> torch.Tensor:
        """Drop the KV of positions ``[start, end)`` of the cached path of ``tokens``.

        Positions already without KV are skipped. Raises ``ValueError`` (tree unchanged)
        for an empty/reversed/out-of-range or page-misaligned span, a path not in the
        tree up to ``end``, or locked KV in the span. Returns the freed slots.
        """
        toks = _as_tokens(tokens)
        P = self.page_size
        if not (0 <= start < end <= len(toks)):
            raise ValueError(f"span [{start}, {end}) is empty, reversed or outside [0, {len(toks)})")
        if start % P or end % P:
            raise ValueError(f"span [{start}, {end}) is not aligned to page_size={P}")
        path, matched = self._walk(toks[:end], split_end=False)
        if matched < end:
            raise ValueError(f"positions up to {end} of this prompt are not in the cache")
        hit = [n for n in path if n.end > start and n.slots is not None]
        if any(n.lock_ref > 0 for n in hit):
            raise ValueError(f"span [{start}, {end}) holds KV locked by a running request")
        freed = []
        for node in hit:
            if node.start < start:
                self._split(node, start - node.start)  # `node` keeps the part from `start`
            if node.end > end:
                node = self._split(node, end - node.start)
            freed.append(self._drop_kv(node))
        return torch.cat(freed) if freed else torch.zeros(0, dtype=torch.int64)

    # ------------------------------------------------------------------ introspection

    def nodes(self) -> list[Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out

    def owned_slots(self) -> torch.Tensor:
        parts = [n.slots for n in self.nodes() if n.slots is not None]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    def reindex(self) -> None:
        """The policy changed every key at once (``CostAware.follow``): rebuild the victim index."""
        self.index.rebuild()

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` unless every structural, accounting and index invariant holds
        (``sglang_holes.cache.tree_audit``)."""
        audit(self)
