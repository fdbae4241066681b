"""``HoleTree.check_integrity``: every invariant of the tree, its accounting and its victim index."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sglang_holes.cache.tree import HoleTree


def audit(tree: HoleTree) -> None:
    """Raise ``AssertionError`` naming the first broken invariant."""
    evictable = protected = 0
    P = tree.page_size
    nodes = tree.nodes()
    for n in nodes:
        p = n.parent
        assert p is not None and p.children.get(n.key[:P]) is n, "dangling node"
        assert len(n.key) > 0 and len(n.key) % P == 0, "empty or page-misaligned node"
        assert n.start == p.end, "node start != parent end"
        assert n.lock_ref >= 0, "negative lock count"
        # lock_ref = locks whose handle is in this subtree, so it covers the children's.
        assert n.lock_ref >= sum(c.lock_ref for c in n.children.values()), "lock counts inconsistent"
        assert n.cached_below == sum(c.holds_kv_below for c in n.children.values()), "cached_below count is off"
        assert (n.cached_below > 0) == n.has_cached_descendant(), "cached_below disagrees with the subtree"
        if n.slots is None:
            assert n.lock_ref > 0 or n.cached_below > 0, "hole without cached descendant"
        else:
            assert n.slots.dtype == torch.int64 and n.slots.numel() == len(n.key), "slot count != key length"
            if n.lock_ref > 0:
                protected += len(n.key)
            else:
                evictable += len(n.key)
    assert (evictable, protected) == (tree.evictable_size, tree.protected_size), (
        f"size accounting: counted {(evictable, protected)}, recorded {(tree.evictable_size, tree.protected_size)}"
    )
    assert tree.node_count == len(nodes), f"node_count {tree.node_count} != {len(nodes)} nodes"
    assert len({n.serial for n in nodes}) == len(nodes), "two nodes share a serial"
    owned = tree.owned_slots()
    assert owned.unique().numel() == owned.numel(), "a slot is owned twice"
    tree.index.check_integrity()
