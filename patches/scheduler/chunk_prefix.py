"""The shared leading prefix of chunk requests (e.g. a system prompt) through the exact tree.

Chunk KV is approximate and never enters the exact tree. The positions before a request's
first chunk are different: nothing precedes them but themselves, so their KV is exact. A
chunk request therefore reads that prefix from the exact tree when it is cached there
(``match_chunk_prefix``: in place, pinned by the tree node through the request's
``ChunkMatch``), and once it has computed the prefix itself, inserts it there
(``seed_chunk_prefix``: the tree then owns those slots, locked until the request's release),
so exact and chunk requests with the same system prompt share its KV.

Units: token positions; the prefix is ``[0, first chunk start)``, cut to whole pages.
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_holes.cache.node import Node, Segment
from sglang_holes.patches.scheduler.request_holes import holes_of


def _lead(cache: Any, req: Any) -> int:
    lead = holes_of(req).chunk_hints.chunks[0][0]
    return lead - lead % cache.page_size


def match_chunk_prefix(cache: Any, req: Any) -> tuple[Segment | None, Node | None]:
    """The exact tree's leading cached run of the request's non-chunk prefix, and the node pinning it."""
    lead = _lead(cache, req)
    tree = cache.namespaces.find((req.extra_key, req.cache_salt))
    if lead == 0 or tree is None or cache.prefix_only:
        return None, None
    m = tree.match(list(req.origin_input_ids[:lead]))
    if not m.cached_prefix_len:
        return None, None
    return Segment(0, m.cached_prefix_len, m.segments[0].slots), m.prefix_node


def seed_chunk_prefix(cache: Any, req: Any, row: torch.Tensor, up_to: int) -> None:
    """Insert the request's non-chunk prefix into the exact tree once computed (``up_to`` covers it).

    The slots it read from the tree stay the tree's; the ones it computed become the tree's
    (duplicates of KV inserted meanwhile are freed, the row repointed). The inserted node stays
    locked until release (``ChunkState.seeded``): the request keeps reading those slots.
    """
    rec = holes_of(req)
    st = rec.chunk
    lead = _lead(cache, req)
    if st is None or st.seeded is not None or lead == 0 or up_to < lead:
        return
    kv = req.kv
    tree = cache._tree(req.extra_key, req.cache_salt)
    owned = torch.ones(lead, dtype=torch.bool)
    owned[: st.exact_prefix] = False  # read from the tree (pinned by the admission lock)
    with cache.namespaces.tracked(tree):
        result = tree.insert(list(req.origin_input_ids[:lead]), row[:lead].to(torch.int64), owned)
    if result.rejected_slots.numel():  # the tree holds this KV already (another request's insert)
        cache.token_to_kv_pool_allocator.free(result.rejected_slots.to(row.device, dtype=row.dtype))
    path = cache.path_device_indices(result.handle.node)
    cache.req_to_token_pool.write((kv.req_pool_idx, slice(0, lead)), path.to(row.dtype))
    if rec.fill is not None and rec.fill.row is not None:
        rec.fill.row[:lead] = path.to(rec.fill.row.device, rec.fill.row.dtype)
    st.seeded = cache.lock(result.handle.node)
    cache.ledger.hand_over(kv.req_pool_idx, [(0, lead)])
