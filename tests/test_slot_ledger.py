"""``SlotLedger`` and the pool ``audit``: the typed operations, and an audit that catches each way a pool breaks."""

from __future__ import annotations

import torch

from sglang_holes.cache.slot_ledger import PoolCensus, RowCensus, SlotLedger, audit, merge_spans, subtract


def test_span_helpers():
    assert merge_spans([(5, 9), (0, 2), (2, 3), (8, 12), (4, 4)]) == [(0, 3), (5, 12)]
    assert subtract([(0, 20)], [(15, 30), (2, 5), (3, 7)]) == [(0, 2), (7, 15)]
    assert subtract([(0, 4), (10, 12)], []) == [(0, 4), (10, 12)]


def test_handed_spans_survive_later_fills_until_release():
    """The chunk-across-pieces bug: each piece's commit replaces reused and pending spans, never handed ones."""
    ledger = SlotLedger()
    ledger.fill(3, reused=[(0, 90)], pending=[(90, 400)])
    ledger.hand_over(3, [(90, 180)])  # checkpoint after piece 1 stored d0
    ledger.fill(3, reused=[(0, 90)], pending=[(250, 400)])  # piece 2's commit
    ledger.hand_over(3, [(180, 250)])
    ledger.fill(3, reused=[(0, 90)], pending=[])  # the last piece
    ledger.check_integrity()
    assert ledger.not_owned(3) == [(0, 250)]
    assert ledger.owned(3, [(0, 420)]) == [(250, 420)]
    ledger.release(3)
    assert ledger.owned(3, [(0, 420)]) == [(0, 420)] and ledger.rows() == []


def _census(pool: int, free: list[int], holders: dict[str, list[int]], rows: dict[str, list[int]],
            page: int = 1, **counts: int) -> PoolCensus:
    held = sum(len(v) for v in holders.values())
    base = dict(available=len(free) * page, evictable=held, protected=0)
    base.update(counts)
    return PoolCensus(pool, page, torch.tensor(free, dtype=torch.int64),
                      {k: torch.tensor(v, dtype=torch.int64) for k, v in holders.items()},
                      [RowCensus(k, torch.tensor(v, dtype=torch.int64)) for k, v in rows.items()], **base)


def test_audit_accepts_a_whole_pool_and_names_each_breakage():
    ok = audit(_census(10, [1, 2, 3], {"tree": [4, 5, 6], "store": [7]}, {"r1": [8, 9, 10]}))
    assert ok.ok and ok.own_tokens == 3, ok
    twice = audit(_census(10, [1, 2, 3], {"tree": [4, 5, 6], "store": [7, 8]}, {"r1": [8, 9, 10]}))
    assert any("owned twice" in p and "store" in p and "request r1" in p for p in twice.problems), twice
    assert any("!= pool 10" in p for p in twice.problems), twice  # SGLang's counts no longer add up either
    leaked = audit(_census(10, [1, 2, 3], {"tree": [4, 5, 6]}, {"r1": [8, 9, 10]}))
    assert any("owned by nobody" in p and "[7]" in p for p in leaked.problems), leaked
    wrong_counts = audit(_census(10, [1, 2, 3], {"tree": [4, 5, 6], "store": [7]}, {"r1": [8, 9, 10]},
                                 evictable=5))
    assert any("evictable 5" in p for p in wrong_counts.problems), wrong_counts
    padding = audit(_census(10, [1, 2, 3], {"tree": [4, 5, 6], "store": [7]}, {"r1": [0, 8, 9, 10]}))
    assert any("outside" in p for p in padding.problems), padding
    stale = audit(_census(10, [1, 2, 3], {"tree": [4, 5, 6], "store": [7]}, {"r1": [8, 9, 10]})._replace(
        stale_rows=[5]))
    assert any("no live request holds: [5]" in p for p in stale.problems), stale
    dup_free = audit(_census(10, [1, 2, 3, 3], {"tree": [4, 5, 6], "store": [7]}, {"r1": [8, 9, 10]}))
    assert any("free list holds 1 pages twice" in p for p in dup_free.problems), dup_free


def test_audit_counts_pages():
    """Page size 4, pool of 3 pages (slots 4..15): a request owning part of a page owns the page."""
    ok = audit(_census(12, [1], {"tree": [8, 9, 10, 11]}, {"r": [12, 13]}, page=4))
    assert ok.ok and ok.own_tokens == 4, ok
    bad = audit(_census(12, [1], {"tree": [8, 9, 10, 11]}, {"r": [11, 12]}, page=4))
    assert not bad.ok
