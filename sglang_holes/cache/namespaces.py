"""``Namespaces``: one ``HoleTree`` per namespace, dropped when empty, sizes as running totals.

Requests with another extra key or cache salt (tenants, LoRA adapters) never share KV, so
each namespace has its own tree. A server that sees thousands of distinct salts must not
keep thousands of empty trees around, nor sum over all of them on every budget query:
a tree is dropped as soon as it holds nothing (no cached token, no node, no lock), and the
evictable / protected sizes over all trees are running totals, updated around every
operation that can change them (``tracked``).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from contextlib import contextmanager

from sglang_holes.cache.eviction import EvictionPolicy
from sglang_holes.cache.node import Node
from sglang_holes.cache.tree import HoleTree

DEFAULT: tuple[None, None] = (None, None)


class Namespaces:
    """Trees by namespace (the default namespace ``(None, None)`` always exists)."""

    def __init__(self, page_size: int = 1, policy: EvictionPolicy | None = None) -> None:
        self.page_size = page_size
        self.policy = policy
        self._trees: dict[Hashable, HoleTree] = {}
        self._by_root: dict[int, HoleTree] = {}
        self._ns_of: dict[int, Hashable] = {}  # id(tree) -> its namespace: dropping stays O(1)
        self.evictable_size = 0
        self.protected_size = 0
        self.get(DEFAULT)

    def get(self, ns: Hashable) -> HoleTree:
        """The namespace's tree, created empty on first use."""
        tree = self._trees.get(ns)
        if tree is None:
            tree = HoleTree(page_size=self.page_size, policy=self.policy)
            self._trees[ns] = tree
            self._by_root[id(tree.root)] = tree
            self._ns_of[id(tree)] = ns
        return tree

    def find(self, ns: Hashable) -> HoleTree | None:
        return self._trees.get(ns)

    def tree_of(self, node: Node) -> HoleTree | None:
        """The tree holding ``node``; None only for the root of a dropped (empty) tree."""
        while node.parent is not None:
            node = node.parent
        return self._by_root.get(id(node))

    def trees(self) -> list[HoleTree]:
        return list(self._trees.values())

    def items(self) -> list[tuple[Hashable, HoleTree]]:
        return list(self._trees.items())

    @contextmanager
    def tracked(self, tree: HoleTree) -> Iterator[HoleTree]:
        """Run an operation on ``tree``: its size changes reach the totals, and it is dropped if empty."""
        evictable, protected = tree.evictable_size, tree.protected_size
        try:
            yield tree
        finally:
            self.evictable_size += tree.evictable_size - evictable
            self.protected_size += tree.protected_size - protected
            self._drop_if_empty(tree)

    def _drop_if_empty(self, tree: HoleTree) -> None:
        root = tree.root
        if tree.total_size or root.children or root.lock_ref > 1:  # the root holds one lock of its own
            return
        ns = self._ns_of.get(id(tree))
        if ns is None or ns == DEFAULT or self._trees.get(ns) is not tree:
            return
        del self._trees[ns], self._by_root[id(root)], self._ns_of[id(tree)]

    def check_integrity(self) -> None:
        """Each tree's integrity, and the running totals equal the trees' sizes."""
        for tree in self._trees.values():
            tree.check_integrity()
        assert self.evictable_size == sum(t.evictable_size for t in self._trees.values()), "evictable total drifted"
        assert self.protected_size == sum(t.protected_size for t in self._trees.values()), "protected total drifted"
