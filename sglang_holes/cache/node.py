"""HoleTree's node and result types, and input validation shared by its operations."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import NamedTuple

import torch


class Segment(NamedTuple):
    """Positions ``[start, end)`` of a matched sequence and their KV slots (None: a hole)."""

    start: int
    end: int
    slots: torch.Tensor | None

    @property
    def cached(self) -> bool:
        return self.slots is not None


class InsertStats(NamedTuple):
    """What an insert tells SGLang's per-node statistics: the request's ``priority`` (higher is kept
    longer by the ``priority`` policy) and ``inserted_len``, the tokens of this key it inserted
    before (its earlier prefill pieces), which count no second hit."""

    priority: int = 0
    inserted_len: int = 0


NO_STATS = InsertStats()


class Node:
    """One tree edge: ``key`` tokens starting at position ``start``; ``slots`` is None for a hole.

    Statistics (logical clock ticks, ``HoleTree.now``): ``hits``, ``last_access`` and ``created``;
    ``log_crf``, the logs of ``cost-aware``'s decayed hit counts, one per decay it keeps (its ``hit``
    sets them; empty before the first);
    ``sg_access``, ``sg_hits`` and ``priority`` are SGLang's ``last_access_time``, ``hit_count`` and
    ``priority`` with SGLang's semantics, for its own policies (``sglang_holes.cache.leaf_policies``).

    Bookkeeping: ``serial`` (creation order, unique in its tree), ``cached_below`` (children whose
    subtree holds KV: 0 means no cached descendant), ``version`` (the victim index's, which voids
    older heap entries).
    """

    __slots__ = ("cached_below", "children", "created", "hits", "key", "last_access", "lock_ref", "log_crf", "parent",
                 "priority", "serial", "sg_access", "sg_hits", "slots", "start", "version")

    def __init__(self, key: tuple[int, ...], start: int, slots: torch.Tensor | None, parent: Node | None):
        self.key = key
        self.start = start
        self.slots = slots
        self.parent = parent
        self.children: dict[tuple[int, ...], Node] = {}
        self.lock_ref = 0
        self.hits = 0
        self.last_access = 0
        self.created = 0
        self.sg_access = 0.0
        self.sg_hits = 0
        self.priority = 0
        self.log_crf: tuple[float, ...] = ()
        self.serial = 0
        self.cached_below = 0
        self.version = 0

    @property
    def end(self) -> int:
        return self.start + len(self.key)

    @property
    def holds_kv_below(self) -> bool:
        """Whether this node or a descendant holds KV (what its parent's ``cached_below`` counts)."""
        return self.slots is not None or self.cached_below > 0

    def has_cached_descendant(self) -> bool:
        """Whether any node below this one still holds KV (a hole above it must then stay); the reference
        for ``cached_below``, by walking the subtree."""
        stack = list(self.children.values())
        while stack:
            n = stack.pop()
            if n.slots is not None:
                return True
            stack.extend(n.children.values())
        return False


class TreeHandle:
    """What a match pins: the deepest matched node holding KV (root if none). Lock it with
    ``HoleTree.lock``; the tree counts this handle's own locks so a double unlock is refused."""

    __slots__ = ("locks", "node")

    def __init__(self, node: Node):
        self.node = node
        self.locks = 0


class MatchResult(NamedTuple):
    segments: list[Segment]  # ordered, covering [0, len(tokens)); slots None = hole
    missing: list[tuple[int, int]]  # spans without KV, the uncached tail included
    reused_tokens: int  # tokens whose KV is cached
    cached_prefix_len: int  # leading run of cached tokens (what stock SGLang would reuse)
    handle: TreeHandle
    prefix_node: Node  # the node ending the leading cached run (the root if there is none)


class InsertResult(NamedTuple):
    rejected_slots: torch.Tensor  # given slots the tree did not take: the caller frees them
    handle: TreeHandle  # deepest node of the inserted path


def _as_tokens(tokens: Sequence[int]) -> tuple[int, ...]:
    out = tuple(tokens)
    try:
        array("q", out)  # validates every element at C speed: match/insert stay O(tokens / page) in Python
    except (TypeError, OverflowError):
        bad = next(t for t in out if not isinstance(t, int) or not -(2**63) <= t < 2**63)
        raise TypeError(f"tokens must be ints, got {type(bad).__name__} {bad!r}") from None
    return out


def _as_slots(slots: torch.Tensor | Sequence[int], n: int) -> torch.Tensor:
    s = slots if isinstance(slots, torch.Tensor) else torch.tensor(list(slots), dtype=torch.int64)
    if s.dim() != 1 or s.dtype.is_floating_point or s.dtype == torch.bool:
        raise TypeError("slots must be a 1-D integer tensor or a sequence of ints")
    if s.numel() != n:
        raise ValueError(f"got {s.numel()} slots for {n} tokens (one slot per token)")
    return s.to(torch.int64)


def common_len(key: tuple[int, ...], tokens: tuple[int, ...], pos: int, page_size: int) -> int:
    """Length (whole pages of ``page_size``) of the common prefix of ``key`` and ``tokens[pos:]``."""
    n = min(len(key), len(tokens) - pos)
    n -= n % page_size
    if key[:n] == tokens[pos : pos + n]:  # one C-level comparison in the common case
        return n
    i = 0
    while i < n and key[i : i + page_size] == tokens[pos + i : pos + i + page_size]:
        i += page_size
    return i
