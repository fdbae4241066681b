"""A pure-torch interpreter of FlashAttention 3's ``flash_attn_with_kvcache`` (paged, varlen).

SGLang's FA3 backend (the Hopper default) calls
``sglang.kernels.ops.attention.flash_attention.flash_attn_with_kvcache``; on a CPU the
kernel cannot run, so the tests put this function in its place inside SGLang's own
``FlashAttentionBackend.forward_extend`` and compare with a float64 oracle. It models
the documented semantics (the docstring of that entry point, and FA3's ``mha_fwd``), for
the arguments SGLang's extend path passes:

* Varlen queries: ``q [total_q, Hq, D]`` with ``cu_seqlens_q [B+1]``; sequence ``b`` has
  ``Lq = cu_seqlens_q[b+1] - cu_seqlens_q[b] <= max_seqlen_q`` queries.
* Paged KV: ``k_cache [num_pages, page_size, Hkv, D]``; key ``j`` of sequence ``b`` lives at
  ``k_cache[page_table[b, j // page_size], j % page_size]``; ``Lk = cache_seqlens[b]``.
* ``causal`` is bottom-right aligned: query ``i`` sees keys ``j <= i + Lk - Lq``. A window
  ``(left, right)`` keeps ``i + Lk - Lq - left <= j <= i + Lk - Lq + right`` (``-1``: unbounded).
* ``softcap > 0``: scores ``s = q.k * softmax_scale`` become ``softcap * tanh(s / softcap)``.
* GQA: query head ``h`` reads KV head ``h // (Hq // Hkv)``. A row with no visible key is zero.
* ``return_softmax_lse``: ``(out, lse)`` with ``lse [Hq, total_q]`` (natural log).
* ``cu_seqlens_k_new`` only describes new ``k``/``v`` to append; without them it is unused
  (checked for shape only). Appending new K/V, rotary, descales, sinks, leftpad and
  ``cache_batch_idx`` are not modelled: passing them raises, never a silent answer.
"""

from __future__ import annotations

from typing import Any

import torch

_UNMODELLED = ("k", "v", "qv", "rotary_cos", "rotary_sin", "cache_batch_idx", "cache_leftpad", "rotary_seqlens",
               "q_descale", "k_descale", "v_descale", "sinks", "score_mod", "aux_tensors", "mask_mod", "rel_bias")
# Scheduling knobs: they change how the kernel splits work, not what it computes.
_SCHEDULE = ("scheduler_metadata", "pack_gqa", "sm_margin", "max_seqlen_k", "rel_bias_prep_cache")


def _check(q: torch.Tensor, page_table: torch.Tensor, cache_seqlens: torch.Tensor, cu_seqlens_q: torch.Tensor,
           cu_seqlens_k_new: torch.Tensor | None, max_seqlen_q: int, page_size: int) -> None:
    batch = cu_seqlens_q.numel() - 1
    if cu_seqlens_q.dtype != torch.int32 or cache_seqlens.dtype != torch.int32 or page_table.dtype != torch.int32:
        raise TypeError("cu_seqlens_q, cache_seqlens and page_table must be int32")
    if cache_seqlens.shape != (batch,) or page_table.shape[0] != batch:
        raise ValueError(f"{batch} sequences: cache_seqlens {tuple(cache_seqlens.shape)} and page_table rows "
                         f"{page_table.shape[0]} must match")
    if cu_seqlens_k_new is not None and cu_seqlens_k_new.shape != (batch + 1,):
        raise ValueError(f"cu_seqlens_k_new must have {batch + 1} entries, got {tuple(cu_seqlens_k_new.shape)}")
    if int(cu_seqlens_q[-1]) != q.shape[0]:
        raise ValueError(f"cu_seqlens_q ends at {int(cu_seqlens_q[-1])}, q has {q.shape[0]} rows")
    lq = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    if batch and (int(lq.min()) < 0 or int(lq.max()) > max_seqlen_q):
        raise ValueError(f"query lengths {lq.tolist()} exceed max_seqlen_q={max_seqlen_q}")
    pages_needed = (cache_seqlens.to(torch.int64) + page_size - 1) // page_size
    if batch and int(pages_needed.max()) > page_table.shape[1]:
        raise ValueError(f"page_table has {page_table.shape[1]} columns, a sequence needs {int(pages_needed.max())}")


def _visible(lq: int, lk: int, causal: bool, window: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Boolean ``[lq, lk]``: bottom-right aligned causal mask and window."""
    i = torch.arange(lq, device=device)[:, None] + (lk - lq)  # the query's diagonal in key coordinates
    j = torch.arange(lk, device=device)[None, :]
    keep = torch.ones(lq, lk, dtype=torch.bool, device=device)
    left, right = window
    if causal:  # FlashAttention sets the right window to 0 under causal
        right = 0
    if right >= 0:
        keep &= j <= i + right
    if left >= 0:
        keep &= j >= i - left
    return keep


# The signature is sgl_kernel's, keyword for keyword: SGLang's FA3 backend calls this stand-in as it calls the
# kernel, so it takes every parameter the kernel takes (hence more than eight).
def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    cache_seqlens: torch.Tensor,
    page_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    cu_seqlens_k_new: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_softmax_lse: bool = False,
    out: torch.Tensor | None = None,
    num_splits: int = 0,
    ver: int = 3,
    **unmodelled: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``flash_attn_with_kvcache`` for paged varlen prefill, by definition (fp32 math).

    Shapes: ``q [total_q, Hq, D]``; ``k_cache``/``v_cache [num_pages, page_size, Hkv, D]``;
    returns ``[total_q, Hq, Dv]`` in ``q.dtype`` (written into ``out`` when given), plus
    ``lse [Hq, total_q]`` with ``return_softmax_lse``. ``num_splits`` only changes the
    kernel's schedule, not its result.
    """
    given = [k for k, v in unmodelled.items() if v is not None and k in _UNMODELLED]
    unknown = [k for k in unmodelled if k not in _UNMODELLED + _SCHEDULE]
    if given or unknown or ver != 3:
        raise NotImplementedError(f"not modelled: {given + unknown or f'ver={ver}'}")
    page_size = k_cache.shape[1]
    _check(q, page_table, cache_seqlens, cu_seqlens_q, cu_seqlens_k_new, max_seqlen_q, page_size)
    hq, hkv, dv = q.shape[1], k_cache.shape[2], v_cache.shape[-1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    k_flat = k_cache.reshape(-1, hkv, k_cache.shape[-1])
    v_flat = v_cache.reshape(-1, hkv, dv)
    result = torch.zeros(q.shape[0], hq, dv, dtype=torch.float32, device=q.device)
    lse = torch.full((hq, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(cu_seqlens_q.numel() - 1):
        q0, q1, lk = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(cache_seqlens[b])
        if q1 == q0:
            continue
        j = torch.arange(lk, device=q.device)
        slots = page_table[b, j // page_size].to(torch.int64) * page_size + j % page_size
        k = k_flat[slots].float().repeat_interleave(hq // hkv, dim=1)
        v = v_flat[slots].float().repeat_interleave(hq // hkv, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), k) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~_visible(q1 - q0, lk, causal, tuple(window_size), q.device), float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # [hq, lq]; -inf for a row with no visible key
        p = torch.exp(s - row_lse[..., None]).nan_to_num(0.0)
        result[q0:q1] = torch.einsum("hqk,khd->qhd", p, v)
        lse[:, q0:q1] = row_lse
    o = result.to(q.dtype)
    if out is not None:
        out.copy_(o)
        o = out
    return (o, lse) if return_softmax_lse else o
