"""ChunkStore: content addressing, namespaces, locks, LRU eviction, slot conservation."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_holes.chunks.store import ChunkStore


def _slots(a: int, b: int) -> torch.Tensor:
    return torch.arange(a, b, dtype=torch.int64)


def test_lookup_insert_namespaces_and_duplicates():
    s = ChunkStore()
    e, rej = s.insert([5, 6, 7], _slots(10, 13), offset=40)
    assert rej.numel() == 0 and (e.offset, s.evictable_size) == (40, 3)
    s.check_integrity()
    assert s.lookup([5, 6, 7]) is e and e.hits == 1
    assert s.lookup([5, 6, 7], namespace="tenant-b") is None  # salts never share
    again, rej = s.insert([5, 6, 7], _slots(20, 23), offset=0)
    assert again is e and rej.tolist() == [20, 21, 22]  # caller frees the duplicate
    s.check_integrity()


def test_locked_entries_survive_eviction_lru_order():
    s = ChunkStore()
    s.insert([1, 2], _slots(0, 2), 0)
    b, _ = s.insert([3, 4, 5], _slots(2, 5), 0)
    s.insert([6], _slots(5, 6), 0)
    s.lookup([1, 2])  # a is now the most recent
    s.lock(b)
    assert (s.evictable_size, s.protected_size) == (3, 3)
    freed = s.evict(1)
    assert freed.tolist() == [5]  # c: least recent unlocked
    freed = s.evict(10)
    assert freed.tolist() == [0, 1] and len(s) == 1  # b is locked
    s.unlock(b)
    assert s.evict(10).tolist() == [2, 3, 4]
    s.check_integrity()
    with pytest.raises(ValueError, match="not locked"):
        s.unlock(b)
    with pytest.raises(ValueError, match="not in the store"):
        s.lock(b)


def test_bad_input():
    s = ChunkStore()
    with pytest.raises(ValueError, match="empty chunk"):
        s.insert([], _slots(0, 0), 0)
    with pytest.raises(ValueError, match="2 slots for a chunk of 3"):
        s.insert([1, 2, 3], _slots(0, 2), 0)
    with pytest.raises(ValueError, match="offset"):
        s.insert([1], _slots(0, 1), -1)
    s.check_integrity()
    assert len(s) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["insert", "lookup", "lock", "unlock", "evict"]),
                          st.integers(0, 7), st.integers(1, 6)), max_size=60))
def test_random_operations_conserve_slots(ops):
    """Every slot is free, owned by exactly one entry, or a rejected duplicate returned to the pool."""
    pool = 200
    free = list(range(pool))
    random.Random(0).shuffle(free)
    s, locks = ChunkStore(), []
    for op, doc, n in ops:
        tokens = [doc] * n  # chunk identity = (doc, length)
        if op == "insert" and len(free) >= n:
            slots = torch.tensor([free.pop() for _ in range(n)])
            _, rej = s.insert(tokens, slots, offset=doc)
            free += rej.tolist()
        elif op == "lookup":
            s.lookup(tokens)
        elif op == "lock" and (e := s.lookup(tokens)) is not None:
            s.lock(e)
            locks.append(e)
        elif op == "unlock" and locks:
            s.unlock(locks.pop())
        elif op == "evict":
            free += s.evict(n).tolist()
        s.check_integrity()
        assert len(free) + s.total_size == pool and len(set(free)) == len(free)
    for e in locks:
        s.unlock(e)
    free += s.evict(pool).tolist()
    assert sorted(free) == list(range(pool))
