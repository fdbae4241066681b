"""Leaves-only eviction on ``HoleTree``, and SGLang's own policies in that form.

A leaf policy evicts whole leaves of the cached set (cached, unlocked nodes with no cached
descendant), smallest key first; when a node goes, its nearest cached ancestor joins the
candidates if it became such a leaf, as in SGLang's ``RadixCache.evict``. The cache stays
prefix-closed unless something else punched a hole.

SGLang's policies (``--radix-eviction-policy``), as the keys of its ``mem_cache/evict_policy.py``
strategies over the statistics ``HoleTree`` keeps with SGLang's semantics (``Node.sg_access``: the
last match or insert through the node; ``sg_hits``: inserts through it past what the inserting
request had inserted; ``priority``: the highest request priority inserted through it):

=========  ==========================================  =========================
``lru``    last access                                 ``LRUStrategy``
``lfu``    (hits, last access)                         ``LFUStrategy``
``slru``   (hits >= protected_threshold, last access)  ``SLRUStrategy`` (default threshold 2)
``priority`` (priority, last access)                   ``PriorityStrategy``
=========  ==========================================  =========================

``tests/test_sglang_policies.py`` runs SGLang's ``RadixCache`` and ``HoleTree`` on the same random
operation sequences and checks they keep the same KV. ``lru-leaf`` is the older LRU of this
project (its own clock and hit counts, which ``cost-aware`` shares).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from sglang_holes.cache.node import InsertStats, Node

INT64_MAX = (1 << 63) - 1  # request priorities are signed 64-bit


class TreeView(Protocol):
    """What a policy reads of the tree it serves (``HoleTree`` satisfies it)."""

    root: Node
    page_size: int
    now: int  # logical clock, one tick per match or insert

    def nodes(self) -> list[Node]:
        """Every node, pre-order DFS from the root."""
        ...

    def touch(self, tokens: list[int], stats: InsertStats | None = None) -> None: ...


def cached_frontier(tree: TreeView) -> list[Node]:
    """Cached, unlocked nodes with no cached descendant."""
    out: list[Node] = []
    has_cached: dict[int, bool] = {}
    for n in reversed(tree.nodes()):  # children before parents (nodes() is a pre-order DFS)
        below = any(c.slots is not None or has_cached[id(c)] for c in n.children.values())
        has_cached[id(n)] = below
        if n.slots is not None and not below and n.lock_ref == 0:
            out.append(n)
    return out


def evictable(n: Node) -> bool:
    return n.parent is not None and n.slots is not None and n.lock_ref == 0


class LeafPolicy:
    """Whole leaves of the cached set, smallest ``key(node)`` first."""

    partial = False

    def __init__(self, name: str, key: Callable[[Node], Any]) -> None:
        self.name = name
        self.key = key

    def victims(self, tree: TreeView, num_tokens: int) -> Iterator[Node]:
        tie = itertools.count()
        heap = [(self.key(n), next(tie), n) for n in cached_frontier(tree)]
        heapq.heapify(heap)
        while heap:
            _, _, n = heapq.heappop(heap)
            if not evictable(n) or n.has_cached_descendant():
                continue
            up = n.parent
            while up is not None and up is not tree.root and up.slots is None:
                up = up.parent
            yield n
            # Its nearest cached ancestor may now be a leaf of the cached set.
            if up is not None and up is not tree.root and evictable(up) and not up.has_cached_descendant():
                heapq.heappush(heap, (self.key(up), next(tie), up))


def lru_leaf() -> LeafPolicy:
    return LeafPolicy("lru-leaf", lambda n: n.last_access)


def sglang_lru() -> LeafPolicy:
    return LeafPolicy("lru", lambda n: n.sg_access)


def sglang_lfu() -> LeafPolicy:
    return LeafPolicy("lfu", lambda n: (n.sg_hits, n.sg_access))


def sglang_slru(protected_threshold: float = 2) -> LeafPolicy:
    if protected_threshold < 1:
        raise ValueError("protected_threshold must be >= 1")
    return LeafPolicy("slru", lambda n: (int(n.sg_hits >= protected_threshold), n.sg_access))


def sglang_priority() -> LeafPolicy:
    return LeafPolicy("priority", lambda n: (n.priority, n.sg_access))


def stamp_like_sglang_checkpoint(tree: TreeView, key: list[int], prompt_len: int, priority: int) -> None:
    """What SGLang's ``RadixCache.checkpoint`` does to the statistics besides inserting ``key`` (the
    request's tokens so far, page-aligned): it splits the prompt off one priority up, so a finished
    request's output KV goes before its prompt, then re-matches the path, stamping it after the
    nodes the insert split off other branches."""
    prompt = prompt_len - prompt_len % tree.page_size
    if 0 < prompt < len(key):
        tree.touch(key[:prompt], InsertStats(min(priority + 1, INT64_MAX), prompt))  # SGLang clamps too
    tree.touch(key)
