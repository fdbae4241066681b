"""SGLang's own eviction policies on ``HoleTree`` keep exactly what SGLang's ``RadixCache`` keeps.

One random operation sequence (inserts with request priorities and earlier-inserted lengths,
matches, locks and unlocks, evictions) runs on SGLang 0.5.23's ``RadixCache`` with
``--radix-eviction-policy`` P and on a ``HoleTree`` with ``make_policy(P)``; after every operation
both hold KV for the same token prefixes and every eviction frees the same tokens. SGLang's
clock starts a new second with each operation and advances a microsecond per read inside it, as
real reads do: nothing is stamped twice at the same instant.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.mem_cache import radix_cache as sglang_radix
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from sglang_holes.cache import HoleTree, TreeHandle, make_policy
from sglang_holes.cache.leaf_policies import checkpoint_like_sglang
from sglang_holes.cache.node import InsertStats

POLICIES = [("lru", {}), ("lfu", {}), ("slru", {}), ("slru", {"protected_threshold": 3}), ("priority", {})]


class _Clock:
    """SGLang's clock: each operation starts a new second, and every read inside it is a little later
    (as real reads are), so SGLang never sees two nodes stamped at the same instant."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 1e-6
        return self.now


class _Allocator:
    """What SGLang's cache calls on its allocator in these operations: frees are counted."""

    device = "cpu"

    def __init__(self) -> None:
        self.freed: list[int] = []

    def free_segment(self, values: torch.Tensor, start_pos: int = 0) -> None:
        self.freed += values.tolist()


class _Rows:
    """SGLang's request-to-token table, as its checkpoint reads and writes it (one row per request)."""

    def __init__(self) -> None:
        self.req_to_token = torch.zeros(1, 256, dtype=torch.int64)

    def write(self, index: tuple[int, slice], values: torch.Tensor) -> None:
        self.req_to_token[index] = values


def _sglang_cache(policy: str, config: dict, page_size: int) -> tuple[RadixCache, _Allocator]:
    alloc = _Allocator()
    params = CacheInitParams(disable=False, req_to_token_pool=_Rows(), token_to_kv_pool_allocator=alloc,
                             page_size=page_size, eviction_policy=policy, eviction_policy_config=config or None)
    return RadixCache(params), alloc


def _sglang_cached(cache: RadixCache) -> set[tuple[int, ...]]:
    out, stack = set(), [(cache.root_node, ())]
    while stack:
        node, prefix = stack.pop()
        for child in node.children.values():
            full = prefix + tuple(child.key.token_ids)
            out.add(full)
            stack.append((child, full))
    return out


def _ours_cached(tree: HoleTree) -> set[tuple[int, ...]]:
    out, stack = set(), [(tree.root, ())]
    while stack:
        node, prefix = stack.pop()
        for child in node.children.values():
            full = prefix + tuple(child.key)
            if child.slots is not None:
                out.add(full)
            stack.append((child, full))
    return out


class _Twins:
    """The same operations on SGLang's cache and on a HoleTree (slots = a counter shared by both)."""

    def __init__(self, policy: str, config: dict, page_size: int, clock: _Clock) -> None:
        self.sg, self.alloc = _sglang_cache(policy, config, page_size)
        self.tree = HoleTree(page_size, make_policy(policy, **config))
        self.clock = clock
        self.next_slot = 1
        self.locks: list[tuple[object, TreeHandle]] = []

    def _tick(self) -> None:
        self.clock.now = float(int(self.clock.now) + 1)

    def insert(self, tokens: list[int], priority: int, inserted_len: int) -> None:
        self._tick()
        slots = torch.arange(self.next_slot, self.next_slot + len(tokens), dtype=torch.int64)
        self.next_slot += len(tokens)
        res = self.sg.insert(InsertParams(key=RadixKey(tokens), value=slots, priority=priority,
                                          inserted_len=inserted_len))
        # SGLang's insert keeps its own KV where it has some (the caller frees the duplicates)
        owned = torch.zeros(len(tokens), dtype=torch.bool)
        owned[res.prefix_len :] = True
        self.tree.insert(tokens, slots, owned, InsertStats(priority, inserted_len))

    def checkpoint(self, prompt: list[int], output: list[int], priority: int) -> None:
        """A request's ``RadixCache.checkpoint`` (SGLang's own) against what ``HoleRadixCache.checkpoint``
        does to the tree: insert, then the prompt split one priority up and the re-match."""
        self._tick()
        tokens = prompt + output
        slots = torch.arange(self.next_slot, self.next_slot + len(tokens), dtype=torch.int64)
        self.next_slot += len(tokens)
        self.sg.req_to_token_pool.req_to_token[0, : len(tokens)] = slots
        kv = SimpleNamespace(req_pool_idx=0, cache_protected_len=0, cache_inserted_len=0, swa_evict_floor=0)
        req = SimpleNamespace(full_untruncated_fill_ids=tokens, origin_input_ids=prompt, kv=kv, extra_key=None,
                              cache_salt=None, priority=priority, lock=None, last_node=None)
        key_len = len(tokens) - len(tokens) % self.tree.page_size
        self.sg.checkpoint(req, up_to=len(tokens))
        self.sg.unlock(req.lock)  # the request finished
        owned = torch.ones(key_len, dtype=torch.bool)  # every slot its own: the tree keeps what it holds
        checkpoint_like_sglang(self.tree, tokens[:key_len], slots[:key_len], owned, prompt_len=len(prompt),
                               priority=priority)

    def match(self, tokens: list[int], lock: bool) -> None:
        self._tick()
        got = self.sg.match_prefix(MatchPrefixParams(key=RadixKey(tokens)))
        ours = self.tree.match(tokens)
        assert got.device_prefix_len == ours.cached_prefix_len
        if lock and got.device_prefix_len:
            self.sg.inc_lock_ref(got.last_device_node)
            self.tree.lock(ours.handle)
            self.locks.append((got.last_device_node, ours.handle))

    def unlock(self, i: int) -> None:
        node, handle = self.locks.pop(i)
        self.sg.dec_lock_ref(node)
        self.tree.unlock(handle)

    def evict(self, n: int) -> None:
        self._tick()
        before = len(self.alloc.freed)
        got = self.sg.evict(EvictParams(num_tokens=n)).num_tokens_evicted
        freed = self.tree.evict(min(n, self.tree.evictable_size))  # as HoleRadixCache.evict asks it
        assert got == freed.numel(), (got, freed.numel())
        assert sorted(self.alloc.freed[before:]) == sorted(freed.tolist())  # the very same KV


def _prompt(rng: random.Random, stems: list[list[int]]) -> list[int]:
    """A shared stem (system prompt, document) and a tail, so prefixes are shared and split."""
    stem = rng.choice(stems)
    cut = rng.randint(1, len(stem))
    return stem[:cut] + [rng.randrange(50, 60) for _ in range(rng.randint(0, 12))]


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("policy, config", POLICIES, ids=lambda p: p if isinstance(p, str) else str(p or ""))
@pytest.mark.parametrize("seed", range(4))
def test_sglang_policy_keeps_what_sglang_keeps(monkeypatch, policy, config, page_size, seed):
    clock = _Clock()
    monkeypatch.setattr(sglang_radix, "time", SimpleNamespace(monotonic=clock.monotonic,
                                                               perf_counter=clock.monotonic))
    rng = random.Random(seed * 31 + page_size)
    stems = [[rng.randrange(1, 40) for _ in range(rng.randint(8, 40))] for _ in range(5)]
    twins = _Twins(policy, config, page_size, clock)
    for _ in range(300):
        op = rng.random()
        if op < 0.3:
            tokens = _prompt(rng, stems)
            inserted = rng.choice([0, 0, rng.randint(0, len(tokens))])
            twins.insert(tokens, rng.randint(0, 3), inserted)
        elif op < 0.45:
            twins.checkpoint(_prompt(rng, stems), [rng.randrange(60, 70) for _ in range(rng.randint(0, 9))],
                             rng.randint(0, 3))
        elif op < 0.75:
            twins.match(_prompt(rng, stems), lock=rng.random() < 0.3)
        elif op < 0.85 and twins.locks:
            twins.unlock(rng.randrange(len(twins.locks)))
        else:
            twins.evict(rng.randint(1, 30))
        assert _ours_cached(twins.tree) == _sglang_cached(twins.sg)
        twins.tree.check_integrity()
    while twins.locks:
        twins.unlock(0)
    twins.evict(10_000)
    assert _ours_cached(twins.tree) == _sglang_cached(twins.sg) == set()


def test_the_policies_order_as_sglangs_strategies():
    """Each policy's key is SGLang's strategy's priority on the same statistics."""
    from sglang.srt.mem_cache.utils import get_eviction_strategy

    from sglang_holes.cache.node import Node

    node = Node((1, 2), 0, torch.tensor([1, 2]), None)
    node.sg_access, node.sg_hits, node.priority = 7, 3, 2
    view = SimpleNamespace(last_access_time=7, hit_count=3, priority=2)
    for policy, config in POLICIES:
        ours = make_policy(policy, **config).key(node)
        assert ours == get_eviction_strategy(policy, config or None).get_priority(view), policy


def test_priority_cost_evicts_lower_priorities_first_then_by_cost():
    """``priority-cost``: KV only low-priority requests inserted goes first, however expensive; within
    one priority the order is ``cost-aware``'s (the cheap head of a long context before its tail)."""
    tree = HoleTree(1, make_policy("priority-cost"))
    low, high = list(range(1, 41)), list(range(100, 400))
    tree.insert(high, torch.arange(1000, 1300), stats=InsertStats(priority=5))
    tree.insert(low, torch.arange(1, 41), stats=InsertStats(priority=0))
    first = tree.evict(40)
    assert sorted(first.tolist()) == list(range(1, 41))  # every low-priority token, the high ones kept
    cost = HoleTree(1, make_policy("cost-aware"))
    cost.insert(high, torch.arange(1000, 1300), stats=InsertStats(priority=5))
    assert torch.equal(tree.evict(16), cost.evict(16))  # then cost-aware's choice: the head of the context
    assert tree.match(high).missing[0] == (0, 16)
