"""``RequestHoles``: everything sglang-holes keeps on one scheduler ``Req``, as ONE attribute.

``req.holes`` is created on first use; each field is written by one step and consumed
(cleared) by the next, so a request that is retracted and scheduled again starts clean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sglang_holes.cache.node import Segment
from sglang_holes.chunks.hints import ChunkHints
from sglang_holes.chunks.placement import ChunkFill
from sglang_holes.chunks.state import ChunkState
from sglang_holes.patches.serving.kv_hints import find_chunk_hints

ATTR = "holes"


@dataclass
class HoleFill:
    """A request with reused KV from its match to the end of its prefill (possibly several pieces).

    SGLang is shown ``reused`` (R) as the request's prefix, so admission, splitting and
    allocation count only the other positions; see ``sglang_holes.cache.extend_plan`` for the
    virtual order this implies. Two kinds: a hole request (KV from the tree beyond a hole) and a
    chunk request reusing chunks (``chunk`` set: KV from the chunk store).

    tree_owned: P0, the leading run of the row the tree owns (SGLang's ``cache_protected_len``;
        0 for a chunk request). segments: the reused spans with their slots, in position order
        (R tokens in all). node: SGLang's ``req.last_node``, locked by admission: it pins every
        reused span until the fill's last checkpoint (a tree node; for chunks a ``ChunkMatch``).
    order / row: set by the first extend: the extend positions in virtual order (holes and tail;
        chunk copies too), and the request's row in real position order (reused and computed
        slots; 0, a padding slot, where nothing is computed yet), on the row's device.
    """

    tree_owned: int
    reused: int
    segments: tuple[Segment, ...]
    node: Any
    chunk: ChunkFill | None = None
    order: torch.Tensor | None = None
    row: torch.Tensor | None = None
    computed: int = 0

    @property
    def virtual_prefix(self) -> int:
        """The prefix SGLang tracks for this request: reused plus covered positions."""
        return self.reused + self.computed

    def first_uncomputed(self) -> int | None:
        """The first prompt position without KV yet (None: the prefill is complete or not started)."""
        if self.order is None or self.computed >= self.order.numel():
            return None
        return int(self.order[self.computed])


@dataclass
class RequestHoles:
    """fill: set by ``match_prefix`` when KV exists beyond a hole; cleared when the prefill is
    complete or the request is released. fallback: set by ``match_prefix`` when a request with
    KV beyond a hole cannot take the hole path (counted once, when it is scheduled). chunk:
    chunk-mode state (admission to release). ``chunk_hints`` is parsed once from ``req.kv_hints``."""

    chunk_hints: ChunkHints | None
    fill: HoleFill | None = None
    fallback: bool = False
    chunk: ChunkState | None = None


def holes_of(req: Any) -> RequestHoles:
    """The request's record (created on first use, chunk hints parsed then; validated at entry)."""
    rec = getattr(req, ATTR, None)
    if rec is None:
        rec = RequestHoles(find_chunk_hints(getattr(req, "kv_hints", None)))
        setattr(req, ATTR, rec)
    return rec


def stock_path_reason(req: Any) -> str | None:
    """Why a request with KV beyond a hole must take SGLang's stock path (None: it can fill holes)."""
    if req.multimodal_inputs is not None or req.input_embeds is not None:
        return "multimodal"
    if getattr(req, "positional_embed_overrides", None) is not None:
        return "positional overrides"
    if getattr(req, "return_hidden_states", False):  # a hole request computes only some positions' states
        return "hidden states"
    if req.return_logprob and req.logprob_start_len not in (-1, None) \
            and req.logprob_start_len < len(req.origin_input_ids):
        return "input logprobs"
    return None
