"""Content-addressed store of document-chunk KV, reusable at any position.

An entry holds the KV slots of one chunk (a run of token ids) computed at some
position ``offset`` (positions ``[offset, offset + len)``); a request that places the
same chunk elsewhere re-rotates K by the position delta (``sglang_holes.chunks.rope``) into
its own slots, or borrows the entry's slots when the offset is unchanged. Entries are
keyed by ``(namespace, tokens)``; the namespace carries the model and SGLang's extra
key / cache salt, so tenants never share chunk KV.

Slot ownership mirrors ``HoleTree``: the store owns the slots of its entries; a locked
entry (``lock_ref > 0``, a running request reads it) is never evicted; ``evict`` and
``drop`` return whole unlocked entries' slots to the caller's allocator.
Sizes are in tokens (slots; page size 1).

What it keeps (``policy``). Under steady novel RAG traffic a store that admits every new
document floods: one-off documents push out the popular ones. ``frequency`` (the default)
counts uses per chunk (``record_use``: once per request that reads or computes it, stored or
not) in a sketch halved every ``aging_window`` uses (old popularity fades), evicts the least
used entry first (least recent among equals) and, when the store is full (``capacity``
tokens), admits a new chunk only if it has been used more often than every entry it would
displace (TinyLFU's admission rule). ``lru``: admit everything, evict the least recent.
``admission`` decides (pure), ``drop`` + ``insert`` commit; ``benchmarks/bench_chunk_store.py``
measures both against an offline ideal on a Zipf stream.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


@dataclass(eq=False)
class ChunkEntry:
    """One cached chunk: ``slots[i]`` holds the KV of ``tokens[i]`` computed at position ``offset + i``.

    ``lead``: the tokens that preceded it when computed, recorded only for a chunk computed near
    the start of a prompt (None otherwise): with them the entry is exact in place, which is what
    lets it serve a prompt's attention-sink positions (``chunks.hints.Sink``)."""

    namespace: Hashable
    tokens: tuple[int, ...]
    slots: torch.Tensor  # int64 [len(tokens)]
    offset: int
    last_access: int
    lock_ref: int = 0
    hits: int = 0
    lead: tuple[int, ...] | None = None

    def exact_at(self, offset: int, lead: Sequence[int]) -> bool:
        """Whether this KV is what a prompt with ``lead`` before the chunk at ``offset`` would compute."""
        return self.lead is not None and offset == self.offset and self.lead == tuple(lead)

    def __len__(self) -> int:
        return len(self.tokens)


POLICIES = ("frequency", "lru")


class Admission(NamedTuple):
    """``admission``'s decision for a new chunk: store it (after dropping ``victims``) or not."""

    admit: bool
    victims: tuple[ChunkEntry, ...] = ()


@dataclass
class ChunkStore:
    """Chunk KV by content; see the module docstring. Call ``check_integrity()`` freely.

    capacity: the most tokens the store holds (None: bounded by the KV pool only, which evicts
    it under pressure like the trees). policy: ``frequency`` or ``lru``. aging_window: uses
    between two halvings of the frequency sketch.
    """

    capacity: int | None = None
    policy: str = "frequency"
    aging_window: int = 2048
    _entries: dict[tuple[Hashable, tuple[int, ...]], ChunkEntry] = field(default_factory=dict)
    _clock: int = 0
    _freq: dict[tuple[Hashable, tuple[int, ...]], float] = field(default_factory=dict)
    _uses: int = 0
    evictable_size: int = 0
    protected_size: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"chunk store policy must be one of {POLICIES}, got {self.policy!r}")
        if self.capacity is not None and (isinstance(self.capacity, bool) or not isinstance(self.capacity, int)
                                          or self.capacity < 1):
            raise ValueError(f"chunk store capacity must be a positive number of tokens, got {self.capacity!r}")
        if self.aging_window < 1:
            raise ValueError(f"aging_window must be >= 1, got {self.aging_window!r}")

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    def __len__(self) -> int:
        return len(self._entries)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    @staticmethod
    def _key(tokens: Sequence[int], namespace: Hashable) -> tuple[Hashable, tuple[int, ...]]:
        return namespace, tuple(int(t) for t in tokens)

    def record_use(self, tokens: Sequence[int], namespace: Hashable = None) -> None:
        """One request read or computed this chunk (stored or not): its popularity, for ``frequency``."""
        key = self._key(tokens, namespace)
        self._freq[key] = self._freq.get(key, 0.0) + 1.0
        self._uses += 1
        if self._uses % self.aging_window == 0:  # old popularity fades; the sketch stays small
            self._freq = {k: f / 2 for k, f in self._freq.items() if f >= 1.0}

    def frequency(self, tokens: Sequence[int], namespace: Hashable = None) -> float:
        return self._freq.get(self._key(tokens, namespace), 0.0)

    def _rank(self, entry: ChunkEntry) -> tuple[float, int]:
        """Eviction order: lowest first."""
        recency = entry.last_access
        if self.policy == "lru":
            return 0.0, recency
        return self._freq.get((entry.namespace, entry.tokens), 0.0), recency

    def _victims(self) -> list[ChunkEntry]:
        return sorted((e for e in self._entries.values() if not e.lock_ref), key=self._rank)

    def admission(self, tokens: Sequence[int], namespace: Hashable = None) -> Admission:
        """Whether to store a new chunk, and which entries to drop first to make room (pure)."""
        need = len(tokens)
        if self.capacity is None or self.total_size + need <= self.capacity:
            return Admission(True)
        if need > self.capacity:
            return Admission(False)
        room, victims = self.capacity - self.total_size, []
        for entry in self._victims():
            if room >= need:
                break
            victims.append(entry)
            room += len(entry)
        if room < need:  # locked entries fill the store
            return Admission(False)
        if self.policy == "frequency":
            mine = self.frequency(tokens, namespace)
            if any(self._rank(v)[0] >= mine for v in victims):
                return Admission(False)
        return Admission(True, tuple(victims))

    def drop(self, victims: Sequence[ChunkEntry]) -> torch.Tensor:
        """Remove unlocked entries (``admission``'s victims); returns their slots for the caller to free."""
        freed = []
        for entry in victims:
            if self._entries.get((entry.namespace, entry.tokens)) is not entry or entry.lock_ref:
                raise ValueError("drop of an entry that is not in the store or is locked")
            del self._entries[(entry.namespace, entry.tokens)]
            self.evictable_size -= len(entry)
            freed.append(entry.slots)
        return torch.cat(freed) if freed else torch.zeros(0, dtype=torch.int64)

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
               namespace: Hashable = None, lead: Sequence[int] | None = None) -> tuple[ChunkEntry, torch.Tensor]:
        """Store a chunk's KV (``lead``: see ``ChunkEntry``); returns ``(entry, rejected)``.

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
        if self.capacity is not None and self.total_size + len(toks) > self.capacity:
            raise ValueError(f"a chunk of {len(toks)} tokens does not fit the store's capacity ({self.capacity}, "
                             f"{self.total_size} held): ask admission() and drop its victims first")
        if lead is not None and len(lead) != offset:
            raise ValueError(f"lead of {len(lead)} tokens for a chunk at offset {offset}")
        entry = ChunkEntry(namespace, toks, slots.clone(), int(offset), self._tick(),
                           lead=None if lead is None else tuple(int(t) for t in lead))
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
        """Free at least ``num_tokens`` slots (or all evictable ones), in the policy's order (``frequency``:
        least used first, least recent among equals; ``lru``: least recent)."""
        victims, total = [], 0
        for entry in self._victims():
            if total >= num_tokens:
                break
            victims.append(entry)
            total += len(entry)
        return self.drop(victims)

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
        assert self.capacity is None or self.total_size <= self.capacity, (self.total_size, self.capacity)
        owned = self.owned_slots()
        assert owned.unique().numel() == owned.numel(), "a slot is owned by two chunk entries"
