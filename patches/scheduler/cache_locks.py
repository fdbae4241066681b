"""Locks of the ``holes`` cache: SGLang's ``lock``/``unlock`` and ``inc_lock_ref``/``dec_lock_ref``.

A lock pins what a request reads in place: a tree node (and so its whole path), or, for a
request reusing stored RAG documents, a ``ChunkMatch``: the store entries it reads and the
exact tree's shared prefix node, if it read one. ``lock`` returns SGLang's ``TreeLock`` with our
``TreeHandle`` as the receipt; ``inc_lock_ref`` keeps its handles per node so that
``dec_lock_ref`` releases one of them, never a forged one.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.mem_cache.base_prefix_cache import DecLockRefResult, IncLockRefResult, TreeLock

from sglang_holes.cache.tree import Node, TreeHandle
from sglang_holes.patches.scheduler.chunk_reuse import ChunkMatch


class CacheLocks:
    """Mixin of ``HoleRadixCache`` (needs its ``_tracked``, ``chunks`` and ``_ref_locks``)."""

    def _lock_node(self, node: Node) -> TreeHandle:
        handle = TreeHandle(node)
        with self._tracked(node) as tree:
            if tree is not None:
                tree.lock(handle)
        return handle

    def _unlock_node(self, handle: TreeHandle) -> None:
        with self._tracked(handle.node) as tree:
            if tree is not None:
                tree.unlock(handle)

    def lock(self, node: Any) -> TreeLock | None:
        if isinstance(node, ChunkMatch):  # the store entries, and the exact tree's shared prefix if read
            self.chunks.lock(node)
            return TreeLock(node, None if node.prefix_node is None else self._lock_node(node.prefix_node))
        return TreeLock(node, self._lock_node(node))  # the receipt is our handle

    def unlock(self, lock: TreeLock | None) -> None:
        if lock is None:
            return
        if isinstance(lock.node, ChunkMatch):
            self.chunks.unlock(lock.node)
        if lock.receipt is not None:
            self._unlock_node(lock.receipt)

    def inc_lock_ref(self, node: Any) -> IncLockRefResult:
        if isinstance(node, ChunkMatch):
            self.chunks.lock(node)
            node = node.prefix_node
        if node is not None:
            self._ref_locks.setdefault(id(node), []).append(self._lock_node(node))
        return IncLockRefResult(delta=0)

    def dec_lock_ref(self, node: Any, params: Any = None) -> DecLockRefResult:
        """Release one ``inc_lock_ref`` of ``node``; ``RuntimeError`` if it holds none (double unlock)."""
        if isinstance(node, ChunkMatch):
            self.chunks.unlock(node)
            node = node.prefix_node
            if node is None:
                return DecLockRefResult(delta=0)
        handles = self._ref_locks.get(id(node))
        if not handles:
            raise RuntimeError("dec_lock_ref on a node without a matching inc_lock_ref")
        handle = handles.pop()
        if not handles:
            del self._ref_locks[id(node)]
        self._unlock_node(handle)
        return DecLockRefResult(delta=0)
