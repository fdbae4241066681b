"""The argument groups every hole-attention entry point takes: the paged KV, and how logits are scored.

Shapes: ``k``, ``v``: ``[num_slots, Hkv, D]`` (with pages of ``P`` tokens, slot ``s`` is row
``s % P`` of page ``s // P``); ``slot_table``: per sequence, the 1-D slot of every position
``[0, seq_len)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class KVCache(NamedTuple):
    """The KV pool a batch attends to and each sequence's slots in it (missing tokens' K/V already written)."""

    k: torch.Tensor
    v: torch.Tensor
    slot_table: Sequence[torch.Tensor]


class Scoring(NamedTuple):
    """``sm_scale`` (None: ``1/sqrt(D)``); ``logits_soft_cap``: ``cap·tanh(x/cap)`` when > 0;
    ``window_left``: keep keys with ``pos - j <= window_left`` (-1: every key)."""

    sm_scale: float | None = None
    logits_soft_cap: float | None = None
    window_left: int = -1


DEFAULT_SCORING = Scoring()
