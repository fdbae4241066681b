"""Input-logprob targets of an extend batch whose queries are not SGLang's virtual positions."""

from __future__ import annotations

import itertools
from typing import Any

import torch


class LogprobTargets:
    """``batch.extend_input_logprob_token_ids`` rebuilt for extends whose queries are not SGLang's
    virtual positions: the next prompt token of each query from the first logprob position on."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch
        self.old = batch.extend_input_logprob_token_ids if batch.return_logprob else None
        starts = batch.extend_logprob_start_lens if self.old is not None else batch.extend_lens
        self.bounds = [0, *itertools.accumulate(e - s for e, s in zip(batch.extend_lens, starts, strict=True))]
        self.parts: dict[int, torch.Tensor] = {}

    def replace(self, i: int, req: Any, queries: torch.Tensor) -> int:
        """Targets of request ``i``'s queries; returns its new ``extend_logprob_start_len``."""
        ids = req.origin_input_ids
        start = len(ids) if req.logprob_start_len == -1 else req.logprob_start_len
        wanted = queries[queries >= start].tolist() if req.return_logprob else []
        self.parts[i] = torch.tensor([ids[p + 1] if p + 1 < len(ids) else 0 for p in wanted], dtype=torch.int64)
        return int(queries.numel()) - len(wanted)

    def commit(self) -> None:
        if self.old is None or not self.parts:
            return
        out = [self.parts.get(i, self.old[a:b]) for i, (a, b) in enumerate(itertools.pairwise(self.bounds))]
        self.batch.extend_input_logprob_token_ids = torch.cat(out).to(self.old.dtype).clamp_(
            0, self.batch.model_config.vocab_size - 1)
