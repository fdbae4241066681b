"""Content-addressed store of document-chunk KV, reusable at any position.

An entry holds the KV slots of one chunk (a run of token ids) computed at some
position ``offset`` (positions ``[offset, offset + len)``); a request that places the
same chunk elsewhere re-rotates K by the position delta (``sglang_holes.chunks.rope``) into
its own slots, or borrows the entry's slots when the offset is unchanged. Entries are
keyed by ``(namespace, tokens)``; the namespace carries the model and SGLang's extra
key / cache salt, so tenants never share chunk KV.

Slot ownership mirrors ``HoleTree``: the store owns the slots of its entries; a locked
entry (``lock_ref > 0``, a running request reads it) is never evicted; ``evict``
returns whole least-recently-used unlocked entries' slots to the caller's allocator.
Sizes are in tokens (slots; page size 1).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class ChunkEntry:
    """One cached chunk: ``slots[i]`` holds the KV of ``tokens[i]`` computed at position ``offset + i``."""

    namespace: Hashable
    tokens: tuple[int, ...]
    slots: torch.Tensor  # int64 [len(tokens)]
    offset: int
    last_access: int
    lock_ref: int = 0
    hits: int = 0

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class ChunkStore:
    """Chunk KV by content; see the module docstring. Call ``check_integrity()`` freely."""

    _entries: dict[tuple[Hashable, tuple[int, ...]], ChunkEntry] = field(default_factory=dict)
    _clock: int = 0
    evictable_size: int = 0
    protected_size: int = 0

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    def __len__(self) -> int:
        return len(self._entries)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def lookup(self, tokens: Sequence[int], namespace: Hashable = None) -> ChunkEntry | None:
        """The entry of this chunk, or None. A hit refreshes its recency."""
        entry = self._entries.get((namespace, tuple(int(t) for t in tokens)))
        if entry is not None:
            entry.last_access = self._tick()
            entry.hits += 1
        return entry

    def get(self, tokens: Sequence[int], namespace: Hashable = None) -> ChunkEntry | None:
        """The entry of this chunk without counting a use (inspection)."""
        return self._entries.get((namespace, tuple(int(t) for t in tokens)))

    def insert(self, tokens: Sequence[int], slots: torch.Tensor, offset: int,
               namespace: Hashable = None) -> tuple[ChunkEntry, torch.Tensor]:
        """Store a chunk's KV; returns ``(entry, rejected)``.

        ``rejected`` are slots the caller still owns and must free: all of ``slots`` when
        the chunk is already stored (the existing entry is kept), else empty.
        """
        toks = tuple(int(t) for t in tokens)
        if not toks:
            raise ValueError("an empty chunk cannot be stored")
        slots = slots.to(torch.int64).flatten()  # any device: the pool's slot ids stay where they are
        if slots.numel() != len(toks):
            raise ValueError(f"{slots.numel()} slots for a chunk of {len(toks)} tokens")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        key = (namespace, toks)
        if key in self._entries:
            entry = self._entries[key]
            entry.last_access = self._tick()
            return entry, slots
        entry = ChunkEntry(namespace, toks, slots.clone(), int(offset), self._tick())
        self._entries[key] = entry
        self.evictable_size += len(entry)
        return entry, slots[:0]

    def lock(self, entry: ChunkEntry) -> None:
        if self._entries.get((entry.namespace, entry.tokens)) is not entry:
            raise ValueError("lock of an entry that is not in the store")
        if entry.lock_ref == 0:
            self.evictable_size -= len(entry)
            self.protected_size += len(entry)
        entry.lock_ref += 1

    def unlock(self, entry: ChunkEntry) -> None:
        if entry.lock_ref <= 0:
            raise ValueError("unlock of a chunk entry that is not locked (unlocked twice?)")
        entry.lock_ref -= 1
        if entry.lock_ref == 0:
            self.protected_size -= len(entry)
            self.evictable_size += len(entry)

    def evict(self, num_tokens: int) -> torch.Tensor:
        """Free at least ``num_tokens`` slots (or all evictable ones) from LRU unlocked entries."""
        freed, total = [], 0
        for entry in sorted(self._entries.values(), key=lambda e: e.last_access):
            if total >= num_tokens:
                break
            if entry.lock_ref:
                continue
            del self._entries[(entry.namespace, entry.tokens)]
            self.evictable_size -= len(entry)
            freed.append(entry.slots)
            total += len(entry)
        return torch.cat(freed) if freed else torch.zeros(0, dtype=torch.int64)

    def owned_slots(self) -> torch.Tensor:
        parts = [e.slots for e in self._entries.values()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def check_integrity(self) -> None:
        """Sizes match the entries, no slot is owned twice, lock counts are sane."""
        ev = pr = 0
        for key, e in self._entries.items():
            assert key == (e.namespace, e.tokens), "entry filed under another key"
            assert e.slots.numel() == len(e.tokens) > 0 and e.offset >= 0
            assert e.lock_ref >= 0 and e.last_access <= self._clock
            if e.lock_ref:
                pr += len(e)
            else:
                ev += len(e)
        assert (ev, pr) == (self.evictable_size, self.protected_size), ((ev, pr), self.evictable_size,
                                                                        self.protected_size)
        owned = self.owned_slots()
        assert owned.unique().numel() == owned.numel(), "a slot is owned by two chunk entries"
