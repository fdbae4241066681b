"""``ForwardBatch.init_new`` hook, the ``HolePlan`` of a forward batch, and the FlashInfer
plan() inputs built from it.

Both hole-aware attention backends derive their plan from ``forward_batch.positions``
alone: a ForwardBatch may be copied field by field on its way to the model, so the
only hole-specific field set on it is ``positions`` (original positions of the
compacted queries, from ``batch.holes``, ``patches/scheduler/extend.py``). Everything
here runs on CPU, so the FlashInfer metadata of a hole batch is tested without a GPU
(``tests/test_flashinfer_backend.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sglang_holes.attention.path_cost import choose_path
from sglang_holes.attention.plan import HolePlan, spans_from_positions

BATCH_ATTR = "holes"  # set by the prepare_for_extend hook (patches/scheduler/extend.py)


def after_init_new(ret: Any, cls: Any, batch: Any, *_: Any, **__: Any) -> Any:
    """Queries of a hole batch run at their original positions (RoPE and attention).

    Consumes ``batch.holes`` (cleared here: the batch object lives on as the running batch).
    """
    positions = getattr(batch, BATCH_ATTR, None)
    if positions is not None and ret.forward_mode.is_extend():
        ret.positions = positions.to(ret.seq_lens.device, non_blocking=True)
        setattr(ret, BATCH_ATTR, positions)  # the host copy the attention backend plans from
        setattr(batch, BATCH_ATTR, None)
    return ret


@dataclass(frozen=True)
class BatchHolePlan:
    """A hole batch: its ``HolePlan`` and, per request, the slot of every position ``[0, seq_len)``."""

    plan: HolePlan
    slot_table: list[torch.Tensor]


def hole_plan_from_positions(forward_batch: Any, req_to_token: torch.Tensor,
                             always: bool = False, page_size: int = 1) -> BatchHolePlan | None:
    """The batch's ``HolePlan``, or None when every request is a plain extend (unless ``always``).

    A request's queries sit at ``positions[start:end]``; for a plain extend those are
    ``arange(prefix, seq)``, for a hole request the missing positions (runs = spans).
    Reads the host copy of the positions the extend hook left (``forward_batch.holes``; else
    ``positions``), ``seq_lens_cpu``, ``extend_seq_lens_cpu``, ``req_pool_indices_cpu`` (else
    ``req_pool_indices``): host data, so planning does not wait for the device. The slot table
    stays on the device of ``req_to_token``.
    """
    if forward_batch.extend_seq_lens_cpu is None:
        return None
    host = getattr(forward_batch, BATCH_ATTR, None)
    pos = (host if host is not None else forward_batch.positions).tolist()
    seq_lens = [int(x) for x in forward_batch.seq_lens_cpu.tolist()]
    holes, start, any_hole = [], 0, False
    for n, m in zip(seq_lens, forward_batch.extend_seq_lens_cpu, strict=True):
        spans = spans_from_positions(pos[start : start + int(m)])
        start += int(m)
        any_hole |= not (len(spans) <= 1 and (not spans or spans[0] == (n - int(m), n)))
        holes.append(spans)
    if not (any_hole or always):
        return None
    rows = getattr(forward_batch, "req_pool_indices_cpu", None)
    rows = (rows if rows is not None else forward_batch.req_pool_indices).tolist()
    table = [req_to_token[int(r), :n].to(torch.int64) for r, n in zip(rows, seq_lens, strict=True)]
    return BatchHolePlan(HolePlan.from_holes(seq_lens, holes, page_size), table)


@dataclass(frozen=True)
class FlashInferHolePrefill:
    """What a hole batch hands to ``BatchPrefillWithPagedKVCacheWrapper.plan`` (built once per batch).

    ``plan_kwargs`` are ``HolePlan.flashinfer_inputs`` (int32 indptrs/indices on
    ``device``; ``custom_mask`` as booleans, never pre-packed) plus head counts and dtypes.
    """

    batch: BatchHolePlan
    path: str
    plan_kwargs: dict[str, Any]


def flashinfer_hole_prefill(
    forward_batch: Any,
    req_to_token: torch.Tensor,
    path: str,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_data_type: torch.dtype,
    kv_data_type: torch.dtype,
    device: torch.device | str,
    page_size: int = 1,
) -> FlashInferHolePrefill | None:
    """The paged-prefill plan of a hole batch (None for a batch without holes).

    ``path`` is ``custom_mask``, ``spans`` or ``auto`` (``sglang_holes.attention.path_cost.choose_path``).
    Sliding windows are not handled here: a model with one takes the stock path.
    """
    batch = hole_plan_from_positions(forward_batch, req_to_token, page_size=page_size)
    if batch is None:
        return None
    if path == "auto":
        kv_bytes = torch.empty((), dtype=kv_data_type).element_size()
        path = choose_path(batch.plan, num_qo_heads, num_kv_heads, head_dim, kv_bytes=kv_bytes)
    kwargs = batch.plan.flashinfer_inputs(path, batch.slot_table)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    kwargs.update(num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim_qk=head_dim,
                  q_data_type=q_data_type, kv_data_type=kv_data_type)
    return FlashInferHolePrefill(batch, path, kwargs)
