"""``Namespaces``: a tree per namespace, dropped when empty, running size totals."""

from __future__ import annotations

import torch

from sglang_holes.cache.eviction import make_policy
from sglang_holes.cache.namespaces import DEFAULT, Namespaces
from sglang_holes.cache.node import TreeHandle


def test_trees_are_dropped_when_empty_and_totals_follow_every_operation():
    ns = Namespaces(policy=make_policy("cost-aware"))
    trees = []
    for salt in range(50):
        tree = ns.get(("k", salt))
        with ns.tracked(tree):
            tree.insert([salt, 1, 2, 3], torch.arange(4) + 4 * salt)
        trees.append(tree)
        ns.check_integrity()
    assert (ns.evictable_size, ns.protected_size, len(ns.trees())) == (200, 0, 51)
    handle = TreeHandle(trees[0].match([0, 1, 2, 3]).handle.node)
    with ns.tracked(trees[0]):
        trees[0].lock(handle)
    assert (ns.evictable_size, ns.protected_size) == (196, 4)
    for tree in trees[1:]:
        with ns.tracked(tree):
            tree.evict(4)
        ns.check_integrity()
    # Every tree gave its KV back; the locked one keeps its KV and stays, the rest are gone.
    assert (ns.evictable_size, ns.protected_size) == (0, 4)
    assert {id(t) for t in ns.trees()} == {id(ns.get(DEFAULT)), id(trees[0])}
    with ns.tracked(trees[0]):
        trees[0].unlock(handle)
    with ns.tracked(trees[0]):
        trees[0].evict(4)
    assert [id(t) for t in ns.trees()] == [id(ns.get(DEFAULT))]
    assert ns.tree_of(trees[3].root) is None  # a dropped tree's root: nothing to lock there
    ns.check_integrity()


def test_a_tree_with_a_locked_hole_path_is_kept():
    ns = Namespaces()
    tree = ns.get("a")
    with ns.tracked(tree):
        tree.insert([1, 2, 3, 4], torch.arange(4))
    handle = TreeHandle(tree.match([1, 2, 3, 4]).handle.node)
    with ns.tracked(tree):
        tree.lock(handle)
        tree.unlock(handle)
        tree.evict_span([1, 2, 3, 4], 0, 2)
    assert ns.find("a") is tree and ns.evictable_size == 2
    with ns.tracked(tree):
        tree.evict(2)
    assert ns.find("a") is None and ns.evictable_size == 0
    ns.check_integrity()
