"""Victim search for ``HoleTree.evict``: an incremental heap, and the full scan it must agree with.

Every eviction policy orders candidates by a key that changes only when the tree tells it that a
node changed (a hit, an insert through it, a split, a lock released, its last cached descendant
gone): SGLang's policies by access stamps and hit counts, ``cost-aware`` by a decayed hit count
whose decay is the same for every node, so two nodes' order never changes while neither is touched
(``sglang_holes.cache.eviction``). So the best victim can be kept in a heap:

* ``HeapIndex``: ``update(node)`` pushes the node's current key with a new version; entries whose
  version is stale, and nodes that are no candidate any more (locked, evicted, no longer a leaf of the
  cached set), are dropped when they surface. ``pop`` costs O(log n) amortized, ``update`` O(log n);
  the heap is rebuilt from the tree when stale entries outnumber the nodes (amortized O(1) per push).
* ``ScanIndex``: the reference. Every ``pop`` scans the whole tree for the candidate with the lowest
  key. ``tests/test_victim_index.py`` runs both on random operation sequences and checks they evict
  the same KV; ``benchmarks/bench_eviction_time.py`` times both.

Keys are compared as ``(policy.key(node), node.serial)``: the serial (creation order) breaks ties
the same way in both.
"""

from __future__ import annotations

import heapq
from typing import Any, Protocol

from sglang_holes.cache.node import Node


class IndexedTree(Protocol):
    """What an index reads of its tree (``HoleTree`` satisfies it)."""

    root: Node
    node_count: int

    def nodes(self) -> list[Node]: ...


class KeyedPolicy(Protocol):
    """What an index reads of its policy."""

    leaves_only: bool  # only leaves of the cached set are candidates

    def key(self, node: Node) -> Any:
        """Sort key, lowest evicted first; must change only when the tree calls ``update(node)``."""
        ...


def is_candidate(node: Node, leaves_only: bool) -> bool:
    """Holds KV, unlocked, in the tree (not the root); with ``leaves_only`` no cached node below it."""
    return (node.parent is not None and node.slots is not None and node.lock_ref == 0
            and not (leaves_only and node.cached_below))


class HeapIndex:
    """The incremental search: a heap of ``(key, serial, version, node)`` with lazy deletion."""

    def __init__(self, policy: KeyedPolicy, tree: IndexedTree) -> None:
        self.policy = policy
        self.tree = tree
        self.heap: list[tuple[Any, int, int, Node]] = []
        self.rebuild()

    def update(self, node: Node) -> None:
        """``node``'s key or candidacy may have changed: its older entries are void, its current one pushed."""
        node.version += 1
        if is_candidate(node, self.policy.leaves_only):
            heapq.heappush(self.heap, (self.policy.key(node), node.serial, node.version, node))
            if len(self.heap) > 2 * self.tree.node_count + 1024:
                self.rebuild()

    def pop(self) -> Node | None:
        """The candidate with the lowest key, taken out of the index (None: no candidate)."""
        while self.heap:
            _, _, version, node = heapq.heappop(self.heap)
            if version == node.version and is_candidate(node, self.policy.leaves_only):
                node.version += 1  # it is out of the index until the next update()
                return node
        return None

    def check_integrity(self) -> None:
        """Every candidate has a current entry, and every current entry still holds its node's key (the
        policy's key changed only where the tree called ``update``)."""
        current = {}
        for key, serial, version, node in self.heap:
            if version == node.version:
                assert key == self.policy.key(node), f"node {serial}'s key changed without an update()"
                current[serial] = node
        for node in self.tree.nodes():
            if is_candidate(node, self.policy.leaves_only):
                assert node.serial in current, f"candidate node {node.serial} is missing from the victim index"

    def rebuild(self) -> None:
        self.heap = []
        for node in self.tree.nodes():
            node.version += 1
            if is_candidate(node, self.policy.leaves_only):
                self.heap.append((self.policy.key(node), node.serial, node.version, node))
        heapq.heapify(self.heap)


class ScanIndex:
    """The reference search: every ``pop`` scans the tree, so the policy's key may also change without
    the tree's knowledge (``benchmarks/policy_replay.Clairvoyant``)."""

    def __init__(self, policy: KeyedPolicy, tree: IndexedTree) -> None:
        self.policy = policy
        self.tree = tree

    def update(self, node: Node) -> None:
        pass

    def rebuild(self) -> None:
        pass

    def check_integrity(self) -> None:
        pass

    def pop(self) -> Node | None:
        policy = self.policy
        best = [(policy.key(n), n.serial, n) for n in self.tree.nodes() if is_candidate(n, policy.leaves_only)]
        return min(best, key=lambda e: e[:2])[2] if best else None
