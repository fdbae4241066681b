"""``SlotLedger``: who owns every KV slot the ``holes`` cache hands out, and the audit that proves it.

A slot of the KV pool has exactly one owner at any time:

* **free**: in the allocator's free list;
* a **holder**: a namespace's exact tree, or the chunk store (each knows its own slots);
* **one live request**: the part of its row that is its own.

A plain request owns ``row[cache_protected_len : allocated)`` (SGLang's rule). A request with
reused KV also has positions in that range that are *not* its own, and this ledger is the one
record of them, per row (``req_pool_idx``):

* ``reused``: a holder's slots read in place (tree spans beyond a hole, chunk store entries);
  pinned by the request's lock; replaced at every extend of the fill;
* ``pending``: positions not computed yet (their row entry is SGLang's padding slot 0);
  replaced at every extend of the fill;
* ``handed``: slots the request computed and then handed to a holder (a chunk stored after a
  prefill piece, the exact-tree prefix a chunk request seeded). They only accumulate until the
  request is released: the holder owns them from then on, whatever later pieces do.

The typed operations below are the only way to change the record. ``audit`` checks a census
of the whole pool against it: every page has exactly one owner, and SGLang's counts add up
(``available + evictable + protected + requests' own == pool``).

Units: spans are half-open ``[start, end)`` token positions of a request's row; slot ids are
token slots; with ``page_size = P`` ownership is checked per page (``slot // P``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

Span = tuple[int, int]


def merge_spans(spans: Iterable[Span]) -> list[Span]:
    """Sorted, merged, non-empty half-open spans."""
    out: list[Span] = []
    for s, e in sorted((int(s), int(e)) for s, e in spans if e > s):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def subtract(ranges: Iterable[Span], minus: Iterable[Span]) -> list[Span]:
    """Half-open ``ranges`` without the positions of ``minus`` (any order, overlaps allowed)."""
    cut = merge_spans(minus)
    out: list[Span] = []
    for a, b in merge_spans(ranges):
        for s, e in cut:
            if e <= a or s >= b:
                continue
            if s > a:
                out.append((a, s))
            a = max(a, e)
        if a < b:
            out.append((a, b))
    return out


@dataclass
class RowClaims:
    """What of one live request's row is not its own (see the module docstring)."""

    reused: list[Span] = field(default_factory=list)
    pending: list[Span] = field(default_factory=list)
    handed: list[Span] = field(default_factory=list)

    def not_owned(self) -> list[Span]:
        return merge_spans([*self.reused, *self.pending, *self.handed])


class LedgerError(AssertionError):
    """The pool's ownership is broken: ``problems`` names the offending pages and owners."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("KV pool ownership broken: " + "; ".join(self.problems))


class RowCensus(NamedTuple):
    """One live request in a census: ``label`` (its rid), and the slot ids of its own positions."""

    label: str
    slots: torch.Tensor


class PoolCensus(NamedTuple):
    """Everything that owns slots, read at one instant (``audit``'s input).

    pool_size: usable slots (SGLang's ``max_total_num_tokens``; slot ids ``1..pool_size``,
        slot 0 is the padding slot). page_size: tokens per page. free_pages: the allocator's
        free page ids. holders: name -> the slot ids a holder owns. rows: live requests' own
        slots. available / evictable / protected: the counts SGLang reads (tokens). stale_rows: rows
        the ledger still has claims for although no live request holds them (a released request's
        claims would hide part of the next owner's row).
    """

    pool_size: int
    page_size: int
    free_pages: torch.Tensor
    holders: Mapping[str, torch.Tensor]
    rows: Sequence[RowCensus]
    available: int
    evictable: int
    protected: int
    stale_rows: Sequence[int] = ()


class AuditReport(NamedTuple):
    """``problems`` is empty when every page has one owner and the counts add up."""

    problems: list[str]
    own_tokens: int  # tokens of the pool owned by live requests (whole pages)

    @property
    def ok(self) -> bool:
        return not self.problems


class SlotLedger:
    """The non-owned spans of every live request's row (keyed by ``req_pool_idx``)."""

    def __init__(self) -> None:
        self._rows: dict[int, RowClaims] = {}

    def _claims(self, row: int) -> RowClaims:
        return self._rows.setdefault(int(row), RowClaims())

    # ----------------------------------------------------------------- operations

    def fill(self, row: int, reused: Iterable[Span], pending: Iterable[Span]) -> None:
        """An extend of a fill was committed: the holder spans it reads in place and the positions
        still to compute (both replace the previous extend's; ``handed`` spans are kept)."""
        claims = self._claims(row)
        claims.reused = merge_spans(reused)
        claims.pending = merge_spans(pending)

    def hand_over(self, row: int, spans: Iterable[Span]) -> None:
        """Spans the request computed now belong to a holder (a stored chunk, a seeded exact prefix)."""
        spans = list(spans)
        if spans:
            claims = self._claims(row)
            claims.handed = merge_spans([*claims.handed, *spans])

    def release(self, row: int) -> None:
        """The request gave its row back (finished, aborted, retracted): forget its claims."""
        self._rows.pop(int(row), None)

    def reset(self) -> None:
        """Every request is gone (``flush_cache`` runs only when idle)."""
        self._rows.clear()

    # ----------------------------------------------------------------- queries

    def not_owned(self, row: int) -> list[Span]:
        claims = self._rows.get(int(row))
        return claims.not_owned() if claims is not None else []

    def owned(self, row: int, ranges: Iterable[Span]) -> list[Span]:
        """``ranges`` of the row without what is not the request's own: what it may free."""
        return subtract(ranges, self.not_owned(row))

    def claims(self, row: int) -> RowClaims | None:
        return self._rows.get(int(row))

    def rows(self) -> list[int]:
        return sorted(self._rows)

    def check_integrity(self) -> None:
        """Each claim list is sorted, merged, non-empty and non-negative. (A handed span may overlap a
        reused one: a seeded exact prefix covers the part the request read from the tree too.)"""
        for row, c in self._rows.items():
            for name, spans in (("reused", c.reused), ("pending", c.pending), ("handed", c.handed)):
                assert spans == merge_spans(spans), (row, name, spans)
                assert all(s >= 0 for s, _ in spans), (row, name, spans)


def audit(census: PoolCensus) -> AuditReport:
    """Prove one owner per page and the counts SGLang reads; ``problems`` says what is wrong.

    A page counts once per owner (a holder or a request owning several slots of a page is one
    owner of it). Pages ``1..pool_size // page_size`` must each have exactly one owner.
    """
    P = census.page_size
    pages = census.pool_size // P
    owners: list[tuple[str, torch.Tensor]] = [("free", census.free_pages.to("cpu", torch.int64).flatten())]
    for name, slots in census.holders.items():
        owners.append((name, (slots.to("cpu", torch.int64).flatten() // P).unique()))
    own_tokens = 0
    for row in census.rows:
        p = (row.slots.to("cpu", torch.int64).flatten() // P).unique()
        own_tokens += int(p.numel()) * P
        owners.append((f"request {row.label}", p))
    problems: list[str] = []
    free = owners[0][1]
    if free.unique().numel() != free.numel():
        problems.append(f"the free list holds {free.numel() - free.unique().numel()} pages twice")
    count = torch.zeros(pages + 1, dtype=torch.int64)
    for name, p in owners:
        bad = p[(p < 1) | (p > pages)]
        if bad.numel():
            problems.append(f"{name} owns pages outside 1..{pages} (e.g. {bad[:8].tolist()})")
        count.index_add_(0, p.clamp(0, pages), torch.ones_like(p))
    twice = (count[1:] > 1).nonzero().flatten() + 1
    if twice.numel():
        who = [name for name, p in owners if bool(torch.isin(p, twice).any())]
        problems.append(f"{twice.numel()} pages owned twice (e.g. {twice[:8].tolist()}; owners among {who[:6]})")
    leaked = (count[1:] == 0).nonzero().flatten() + 1
    if leaked.numel():
        problems.append(f"{leaked.numel()} pages owned by nobody (leaked, e.g. {leaked[:8].tolist()})")
    if census.stale_rows:
        problems.append(f"the ledger holds claims of rows no live request holds: {list(census.stale_rows)[:8]}")
    held = sum(int(s.numel()) for s in census.holders.values())
    if census.evictable + census.protected != held:
        problems.append(f"evictable {census.evictable} + protected {census.protected} != {held} tokens the "
                        "holders own")
    if census.available != free.numel() * P:
        problems.append(f"available {census.available} != {free.numel()} free pages")
    total = census.available + census.evictable + census.protected + own_tokens
    if total != census.pool_size:
        problems.append(f"available {census.available} + evictable {census.evictable} + protected "
                        f"{census.protected} + requests' own {own_tokens} = {total} != pool {census.pool_size}")
    return AuditReport(problems, own_tokens)
