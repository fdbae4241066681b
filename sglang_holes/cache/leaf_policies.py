"""Leaves-only eviction on ``HoleTree``, and SGLang's own policies in that form.

A leaf policy evicts whole leaves of the cached set (cached, unlocked nodes with no cached
descendant), smallest key first; when a node goes, its nearest cached ancestor joins the
candidates if it became such a leaf, as in SGLang's ``RadixCache.evict``. The keys change only
when the tree updates a node, so the search is a heap kept up to date (``victim_index.HeapIndex``). The cache stays
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

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from sglang_holes.cache.node import InsertStats, Node
from sglang_holes.cache.victim_index import HeapIndex

if TYPE_CHECKING:  # tree.py imports this module
    import torch

    from sglang_holes.cache.node import InsertResult
    from sglang_holes.cache.tree import HoleTree

INT64_MAX = (1 << 63) - 1  # request priorities are signed 64-bit


class TreeView(Protocol):
    """What a policy reads of the tree it serves (``HoleTree`` satisfies it)."""

    root: Node
    page_size: int
    node_count: int
    now: int  # logical clock, one tick per match or insert

    def nodes(self) -> list[Node]:
        """Every node, pre-order DFS from the root."""
        ...

    def touch(self, tokens: list[int], stats: InsertStats | None = None) -> None: ...


class LeafPolicy:
    """Whole leaves of the cached set, smallest ``key(node)`` first."""

    partial = False
    leaves_only = True

    def __init__(self, name: str, key: Callable[[Node], Any]) -> None:
        self.name = name
        self.key = key

    def hit(self, node: Node, now: int) -> None:
        """A match walked through ``node`` (the tree's own statistics are all these policies read)."""

    def index(self, tree: TreeView) -> HeapIndex:
        return HeapIndex(self, tree)


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


def checkpoint_like_sglang(tree: HoleTree, key: list[int], slots: torch.Tensor, owned: torch.Tensor | None = None,
                           *, prompt_len: int, priority: int = 0, inserted_len: int = 0) -> InsertResult:
    """A request's checkpoint as SGLang's ``RadixCache.checkpoint`` leaves the tree's statistics.

    ``key``: the request's tokens so far (page-aligned), ``slots``/``owned`` as ``HoleTree.insert``;
    ``prompt_len``: the request's prompt length (tokens); ``inserted_len``: how many of ``key``'s
    tokens the same request inserted at earlier checkpoints (its earlier prefill pieces), which
    count no hit again. After the insert, SGLang splits the prompt off one priority up (a finished
    request's output KV goes before its prompt), then re-matches the path, stamping it after the
    nodes the insert split off other branches. The engine's cache, the policy replay and the
    equivalence tests all go through here, so they cannot drift apart.
    """
    result = tree.insert(key, slots, owned, InsertStats(priority, inserted_len))
    prompt = prompt_len - prompt_len % tree.page_size
    if 0 < prompt < len(key):
        tree.touch(key[:prompt], InsertStats(min(priority + 1, INT64_MAX), prompt))  # SGLang clamps too
    tree.touch(key)
    return result
