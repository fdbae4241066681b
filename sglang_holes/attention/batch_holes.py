"""``BatchHoles``: what one extend batch's attention must know about its holes, built once.

An engine's extend step (SGLang: the ``prepare_for_extend`` hook's commit step) builds it from
its per-request plans and hands it, unchanged, to the forward and the attention backend:
every request's queries at their ORIGINAL positions (RoPE and the attention mask follow
them), the keys each request attends to, and which row of the slot table is its own.

Units: positions and lengths are tokens; spans are half-open ``[start, end)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sglang_holes.attention.plan import HolePlan, Span, spans_from_positions


@dataclass(frozen=True)
class BatchHoles:
    """One extend batch, request by request (batch order).

    rows: each request's row of the engine's slot table (SGLang: ``req_to_token``).
    seq_lens: keys each request attends to: row positions ``[0, seq_len)``.
    queries: each request's query positions (int64, host), in the order the forward sees them;
        a plain extend's are ``arange(seq_len - m, seq_len)``.
    fills: how many requests read reused KV beyond a hole or from the chunk store (0: the batch
        is a plain extend batch and attention may take the engine's stock path).
    positions: ``queries`` concatenated (``[num_queries]`` int64, host): what the model's
        ``positions`` must be.
    """

    rows: tuple[int, ...]
    seq_lens: tuple[int, ...]
    queries: tuple[torch.Tensor, ...]
    fills: int
    positions: torch.Tensor

    @classmethod
    def build(cls, rows: Sequence[int], seq_lens: Sequence[int], queries: Sequence[torch.Tensor],
              fills: int) -> BatchHoles:
        """Validated: one row, length and query list per request; every query inside ``[0, seq_len)``."""
        if not len(rows) == len(seq_lens) == len(queries):
            raise ValueError(f"{len(rows)} rows, {len(seq_lens)} lengths and {len(queries)} query lists")
        for i, (n, q) in enumerate(zip(seq_lens, queries, strict=True)):
            if q.numel() and not (0 <= int(q.min()) and int(q.max()) < n):
                raise ValueError(f"request {i}: a query position lies outside [0, {n})")
        queries = tuple(q.to(torch.int64) for q in queries)
        positions = torch.cat(queries) if queries else torch.empty(0, dtype=torch.int64)
        return cls(tuple(int(r) for r in rows), tuple(int(n) for n in seq_lens), queries, int(fills), positions)

    @property
    def has_fill(self) -> bool:
        return self.fills > 0

    @property
    def num_queries(self) -> int:
        return int(self.positions.numel())

    @property
    def extend_lens(self) -> tuple[int, ...]:
        return tuple(int(q.numel()) for q in self.queries)

    def spans(self) -> list[list[Span]]:
        """Per request, its queries as runs of consecutive positions."""
        return [spans_from_positions(q.tolist()) for q in self.queries]

    def plan(self, page_size: int = 1) -> HolePlan:
        """The batch's ``HolePlan`` (``page_size``: tokens per KV page of the slot table it will index)."""
        return HolePlan.from_holes(list(self.seq_lens), self.spans(), page_size)

    def slot_table(self, req_to_token: torch.Tensor) -> list[torch.Tensor]:
        """Per request, the slot of every position ``[0, seq_len)`` (int64, on ``req_to_token``'s device)."""
        return [req_to_token[r, :n].to(torch.int64) for r, n in zip(self.rows, self.seq_lens, strict=True)]
