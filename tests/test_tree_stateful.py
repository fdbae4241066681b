"""HoleTree against a naive oracle, driven by hypothesis' stateful testing.

The oracle is the set of cached facts: the KV of position p of a sequence depends on
its first p + 1 tokens only, and the tree shares KV by whole pages, so a fact is
``tokens[:end of p's page] -> slot``. Every step checks
``check_integrity()``, the match result against the oracle, slot conservation
(allocator free + tree-owned + caller-held = total) and that locked KV survives.
"""

from __future__ import annotations

import os

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sglang_holes import HoleTree, make_policy

TOTAL_SLOTS = 96
NIGHTLY = os.environ.get("SGLANG_HOLES_NIGHTLY") == "1"

# A small alphabet and shared stems make rich trees: shared prefixes, splits, branches.
STEMS = [(1, 2, 3, 4, 5, 6, 7, 8), (1, 2, 3, 9, 9), (4, 4, 4, 4), ()]
sequences = st.builds(
    lambda stem, tail: stem + tuple(tail),
    st.sampled_from(STEMS),
    st.lists(st.integers(1, 4), min_size=0, max_size=12),
).filter(lambda s: len(s) > 0)


class TreeMachine(RuleBasedStateMachine):
    @initialize(page_size=st.sampled_from([1, 2, 4]), policy=st.sampled_from(["lru-leaf", "cost-aware"]))
    def setup(self, page_size, policy):
        self.P = page_size
        self.tree = HoleTree(page_size=page_size, policy=make_policy(policy))
        self.free: list[int] = list(range(TOTAL_SLOTS))
        self.held: list[int] = []  # caller-held (allocated, not yet given to the tree)
        self.facts: dict[tuple[tuple[int, ...], int], int] = {}
        self.locked: list[tuple[object, tuple[int, ...], int]] = []  # (handle, tokens, reused prefix end)

    # -------------------------------------------------------------- oracle helpers

    def key(self, toks: tuple[int, ...], p: int) -> tuple[tuple[int, ...], int]:
        return (toks[: (p // self.P + 1) * self.P], p % self.P)

    def expected_slots(self, toks: tuple[int, ...]) -> list[int | None]:
        aligned = len(toks) - len(toks) % self.P
        return [self.facts.get(self.key(toks, p)) if p < aligned else None for p in range(len(toks))]

    def check_match(self, toks, result):
        got: list[int | None] = [None] * len(toks)
        pos = 0
        for s, e, slots in result.segments:
            assert s == pos and e > s
            if slots is not None:
                got[s:e] = slots.tolist()
            pos = e
        assert pos == len(toks)
        assert got == self.expected_slots(toks)
        assert result.reused_tokens == sum(x is not None for x in got)
        assert result.missing == [(s, e) for s, e, sl in result.segments if sl is None]

    # -------------------------------------------------------------- rules

    @rule(toks=sequences)
    def match(self, toks):
        self.check_match(toks, self.tree.match(toks))

    @rule(toks=sequences, fresh=st.booleans())
    def compute_and_insert(self, toks, fresh):
        """A request: match, allocate slots for what is missing (or for everything, as a
        duplicate computation would), then insert and free what the tree rejects."""
        result = self.tree.match(toks)
        row = [None] * len(toks)
        for s, e, slots in result.segments:
            if slots is not None and not fresh:
                row[s:e] = slots.tolist()
        need = [p for p in range(len(toks)) if row[p] is None]
        if len(need) > len(self.free):
            return
        for p in need:
            row[p] = self.free.pop()
            self.held.append(row[p])
        before = self.expected_slots(toks)
        out = self.tree.insert(toks, torch.tensor(row))
        aligned = len(toks) - len(toks) % self.P
        expect_rejected = [row[p] for p in range(len(toks)) if p >= aligned or (before[p] is not None
                                                                               and before[p] != row[p])]
        assert sorted(out.rejected_slots.tolist()) == sorted(expect_rejected)
        for p in range(aligned):
            self.facts.setdefault(self.key(toks, p), row[p])
        for s in row:
            if s in self.held:
                self.held.remove(s)
        self.free += out.rejected_slots.tolist()

    @rule(toks=sequences)
    def lock(self, toks):
        result = self.tree.match(toks)
        self.tree.lock(result.handle)
        self.locked.append((result.handle, toks, result.handle.node.end))

    @precondition(lambda self: self.locked)
    @rule(i=st.integers(0, 100))
    def unlock(self, i):
        handle, _, _ = self.locked.pop(i % len(self.locked))
        self.tree.unlock(handle)

    @rule(n=st.integers(1, 40))
    def evict(self, n):
        locked_before = self.locked_facts()
        if n > self.tree.evictable_size:
            before = sorted(self.tree.owned_slots().tolist())
            try:
                self.tree.evict(n)
            except ValueError:
                assert sorted(self.tree.owned_slots().tolist()) == before
                return
            raise AssertionError("evicting more than evictable must raise")
        freed = self.tree.evict(n).tolist()
        assert len(freed) >= n
        self.forget(freed)
        assert locked_before <= set(self.facts.items())

    @rule(toks=sequences, a=st.integers(0, 30), length=st.integers(1, 8))
    def evict_span(self, toks, a, length):
        a, b = a * self.P, (a + length) * self.P
        try:
            freed = self.tree.evict_span(toks, a, b).tolist()
        except ValueError:
            return
        keys = [self.key(toks, p) for p in range(a, b)]
        expect = {self.facts[k] for k in keys if k in self.facts}
        assert set(freed) == expect
        self.forget(freed)

    # -------------------------------------------------------------- invariants

    def locked_facts(self) -> set[tuple[tuple[int, ...], int]]:
        out = set()
        for _, toks, end in self.locked:
            keys = [self.key(toks, p) for p in range(end)]
            out |= {(k, self.facts[k]) for k in keys if k in self.facts}
        return out

    def forget(self, freed):
        gone = set(freed)
        self.facts = {k: v for k, v in self.facts.items() if v not in gone}
        self.free += freed

    @invariant()
    def integrity(self):
        if not hasattr(self, "tree"):
            return
        self.tree.check_integrity()
        owned = self.tree.owned_slots().tolist()
        assert sorted(self.free + owned + self.held) == list(range(TOTAL_SLOTS))  # conservation
        assert sorted(owned) == sorted(self.facts.values())
        assert self.tree.total_size == len(owned)


TreeMachine.TestCase.settings = settings(
    max_examples=2000 if NIGHTLY else 60, stateful_step_count=50 if NIGHTLY else 30, deadline=None
)
test_hole_tree_against_oracle = TreeMachine.TestCase
