"""A pure-torch interpreter of FlashInfer 0.7.2's paged prefill plan()/run() semantics.

It lets a CPU-only machine vouch for the exact tensors the GPU path hands to
``BatchPrefillWithPagedKVCacheWrapper``: the tests feed it the keywords from
``HolePlan.flashinfer_inputs`` and compare with dense causal attention; the SGLang
integration uses it as a stand-in for the wrapper on CPU. It models what the
kernel does, as read from the FlashInfer 0.7.2 source (summarised in docs/design.md):

* Requests: ``qo_indptr [B+1]`` tokens; ``paged_kv_indptr [B+1]`` pages indexing
  ``paged_kv_indices``; ``kv_len_b = (pages_b - 1) * page_size + last_page_len[b]``;
  each request's KV starts at slot 0 of its first page.
* Causal is bottom-right aligned: query ``i`` of a request sees ``kv_idx <= kv_len - qo_len + i``.
* A boolean ``custom_mask`` is packed per request with ``segment_packbits(...,
  bitorder="little")``: each request's ``qo_len * kv_len`` bits are padded to a byte
  boundary and ``mask_indptr`` becomes a BYTE offset. The kernel reads bit
  ``off = q * kv_len + kv`` as ``(ptr[off // 8] >> (off % 8)) & 1``. With a mask,
  ``causal`` is ignored.
* A ``packed_custom_mask`` passed directly keeps ``mask_indptr`` in ELEMENT units,
  which the kernel reads as bytes: wrong when B > 1 (pitfall 1, flashinfer#2201).
  The interpreter reproduces that, so a plan that hits the bug fails its tests.
* ``window_left >= 0`` keeps key ``kv_idx`` iff ``q_abs - kv_idx <= window_left`` with
  ``q_abs = kv_len - qo_len + i``; ``logits_soft_cap > 0`` applies ``cap * tanh(x / cap)``.
* The mask length is never checked by FlashInfer (flashinfer#3176); the interpreter
  raises instead, so a wrong length cannot pass silently here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from sglang_holes.attention.reference import masked_attention


def packbits_little(bits: torch.Tensor) -> torch.Tensor:
    """``numpy.packbits(bits, bitorder="little")`` in torch: element ``8B + b`` -> bit ``b`` of byte ``B``."""
    bits = bits.flatten().to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = (2 ** torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def segment_packbits(mask: torch.Tensor, elem_indptr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashInfer's ``segment_packbits(mask, indptr, bitorder="little")``: pack each segment
    separately (padded to whole bytes) and return ``(packed, byte_indptr)``."""
    packed, indptr = [], [0]
    for b in range(elem_indptr.numel() - 1):
        seg = packbits_little(mask[int(elem_indptr[b]) : int(elem_indptr[b + 1])])
        packed.append(seg)
        indptr.append(indptr[-1] + seg.numel())
    out = torch.cat(packed) if packed else torch.zeros(0, dtype=torch.uint8)
    return out, torch.tensor(indptr, dtype=torch.int64)


@dataclass(frozen=True)
class InterpretedPlan:
    """What ``plan()`` leaves behind for ``run()``: per-request lengths, pages and mask bytes."""

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_lens: torch.Tensor
    page_size: int
    causal: bool
    packed_mask: torch.Tensor | None  # uint8 bytes
    mask_indptr: torch.Tensor | None  # as the kernel reads it: byte offsets per request
    window_left: int
    logits_soft_cap: float | None
    sm_scale: float | None


# Takes BatchPrefillWithPagedKVCacheWrapper.plan()'s keywords as they are (the wrapper stand-in forwards them
# unchanged), hence more than eight parameters.
def interpret_plan(
    qo_indptr: torch.Tensor,
    paged_kv_indptr: torch.Tensor,
    paged_kv_indices: torch.Tensor,
    paged_kv_last_page_len: torch.Tensor,
    page_size: int,
    custom_mask: torch.Tensor | None = None,
    packed_custom_mask: torch.Tensor | None = None,
    causal: bool = False,
    window_left: int = -1,
    logits_soft_cap: float | None = None,
    sm_scale: float | None = None,
    **_ignored: Any,
) -> InterpretedPlan:
    """Interpret ``BatchPrefillWithPagedKVCacheWrapper.plan(...)`` keywords (heads/dtypes ignored)."""
    qo = qo_indptr.to(torch.int64).cpu()
    kvp = paged_kv_indptr.to(torch.int64).cpu()
    last = paged_kv_last_page_len.to(torch.int64).cpu()
    B = qo.numel() - 1
    if kvp.numel() != B + 1 or last.numel() != B:
        raise ValueError("qo_indptr, paged_kv_indptr and paged_kv_last_page_len disagree on the batch size")
    if int(kvp[-1]) != paged_kv_indices.numel():
        raise ValueError("paged_kv_indptr[-1] must equal len(paged_kv_indices)")
    npages = kvp[1:] - kvp[:-1]
    if bool((npages < 1).any()) or bool(((last < 1) | (last > page_size)).any()):
        raise ValueError("every request needs >= 1 page and 1 <= last_page_len <= page_size")
    kv_lens = (npages - 1) * page_size + last
    qo_lens = qo[1:] - qo[:-1]
    packed = mask_indptr = None
    elem_indptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(qo_lens * kv_lens, 0)])
    if custom_mask is not None:
        if custom_mask.numel() != int(elem_indptr[-1]):
            raise ValueError(
                f"custom_mask has {custom_mask.numel()} elements, the plan needs {int(elem_indptr[-1])} "
                "(FlashInfer would silently read garbage: flashinfer#3176)"
            )
        packed, mask_indptr = segment_packbits(custom_mask.bool().cpu(), elem_indptr)
    elif packed_custom_mask is not None:
        # 0.7.2 keeps the element-unit indptr here, and the kernel reads it as bytes.
        packed, mask_indptr = packed_custom_mask.to(torch.uint8).cpu(), elem_indptr
    return InterpretedPlan(
        qo_indptr=qo, kv_indptr=kvp, kv_indices=paged_kv_indices.to(torch.int64).cpu(), kv_lens=kv_lens,
        page_size=page_size, causal=bool(causal), packed_mask=packed, mask_indptr=mask_indptr,
        window_left=window_left, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
    )


def _request_keep(ip: InterpretedPlan, b: int, qo_len: int, kv_len: int) -> torch.Tensor:
    i = torch.arange(qo_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    q_abs = kv_len - qo_len + i
    if ip.packed_mask is not None:
        off = i * kv_len + j
        base = int(ip.mask_indptr[b])
        byte_idx = base + torch.div(off, 8, rounding_mode="floor")
        if byte_idx.numel() and int(byte_idx.max()) >= ip.packed_mask.numel():
            raise IndexError("custom mask read past its end")
        byte = ip.packed_mask[byte_idx].to(torch.int32)
        keep = ((byte >> (off % 8)) & 1).bool()
    elif ip.causal:
        keep = j <= q_abs
    else:
        keep = torch.ones(qo_len, kv_len, dtype=torch.bool)
    if ip.window_left >= 0:
        keep = keep & ((q_abs - j) <= ip.window_left)
    return keep


def interpret_run(
    ip: InterpretedPlan,
    q: torch.Tensor,
    paged_kv_cache: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Interpret ``run(q, (k_cache, v_cache))`` with NHD caches ``[pages, page_size, Hkv, D]``."""
    k_pages, v_pages = paged_kv_cache
    P = ip.page_size
    if k_pages.dim() != 4 or k_pages.shape[1] != P:
        raise ValueError(f"paged cache must be [pages, {P}, Hkv, D], got {tuple(k_pages.shape)}")
    if q.shape[0] != int(ip.qo_indptr[-1]):
        raise ValueError(f"q has {q.shape[0]} rows, the plan {int(ip.qo_indptr[-1])}")
    scale = ip.sm_scale if ip.sm_scale is not None else q.shape[-1] ** -0.5
    out = torch.zeros(q.shape[0], q.shape[1], v_pages.shape[-1], dtype=q.dtype, device=q.device)
    for b in range(ip.qo_indptr.numel() - 1):
        qa, qb = int(ip.qo_indptr[b]), int(ip.qo_indptr[b + 1])
        kv_len = int(ip.kv_lens[b])
        pages = ip.kv_indices[int(ip.kv_indptr[b]) : int(ip.kv_indptr[b + 1])].to(k_pages.device)
        k = k_pages[pages].reshape(-1, *k_pages.shape[2:])[:kv_len]
        v = v_pages[pages].reshape(-1, *v_pages.shape[2:])[:kv_len]
        if qb == qa:
            continue
        keep = _request_keep(ip, b, qb - qa, kv_len).to(q.device)
        out[qa:qb] = masked_attention(q[qa:qb], k, v, keep, scale, ip.logits_soft_cap)
    return out


class InterpretedPrefillWrapper:
    """Drop-in stand-in for ``BatchPrefillWithPagedKVCacheWrapper`` (NHD) that runs on CPU.

    Mirrors the wrapper's ``plan(...)`` / ``run(q, paged_kv_cache)`` calling
    convention, including positional plan arguments, so code written against the
    real wrapper runs unchanged against this interpreter.
    """

    _PLAN_ARGS = (
        "qo_indptr", "paged_kv_indptr", "paged_kv_indices", "paged_kv_last_page_len",
        "num_qo_heads", "num_kv_heads", "head_dim_qk", "page_size",
    )

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        self._plan: InterpretedPlan | None = None

    def plan(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(zip(self._PLAN_ARGS, args, strict=False))
        self._plan = interpret_plan(**kwargs)

    begin_forward = plan

    def run(self, q: torch.Tensor, paged_kv_cache: Any, *_: Any, k_scale: float | None = None,
            v_scale: float | None = None, **__: Any) -> torch.Tensor:
        """``run``: a 5-D ``[pages, 2, P, H, D]`` cache or a ``(k, v)`` pair of 4-D ``[pages, P, H, D]``
        or 3-D ``[slots, H, D]`` (page_size 1, as SGLang passes it) NHD caches. ``k_scale``
        multiplies ``sm_scale``, ``v_scale`` the output (0.7.2 ``prefill.py`` run())."""
        if self._plan is None:
            raise RuntimeError("run() before plan()")
        if isinstance(paged_kv_cache, torch.Tensor):
            if paged_kv_cache.dim() == 4:  # [slots, 2, H, D], page_size 1
                paged_kv_cache = paged_kv_cache.unsqueeze(2)
            paged_kv_cache = (paged_kv_cache[:, 0], paged_kv_cache[:, 1])
        k, v = (x.unsqueeze(1) if x.dim() == 3 else x for x in paged_kv_cache)
        ip = self._plan
        if k_scale is not None:
            base = ip.sm_scale if ip.sm_scale is not None else q.shape[-1] ** -0.5
            ip = replace(ip, sm_scale=base * k_scale)
        out = interpret_run(ip, q, (k, v))
        return out * v_scale if v_scale is not None else out

    # FlashInfer's own deprecated forward() signature, which SGLang calls: every keyword it may pass.
    def forward(self, q: torch.Tensor, paged_kv_cache: Any, causal: bool = False, pos_encoding_mode: str = "NONE",
                use_fp16_qk_reduction: bool = False, k_scale: float | None = None, v_scale: float | None = None,
                window_left: int = -1, logits_soft_cap: float | None = None, sm_scale: float | None = None,
                rope_scale: float | None = None, rope_theta: float | None = None) -> torch.Tensor:
        """The deprecated ``forward`` SGLang calls: it overrides the plan's ``causal``, ``window_left``,
        ``logits_soft_cap`` and ``sm_scale`` with its own arguments, then runs (0.7.2 ``prefill.py``
        L3214-3238). A custom mask from ``plan`` still wins over ``causal``."""
        if pos_encoding_mode != "NONE":
            raise NotImplementedError("the interpreter models pos_encoding_mode='NONE' only (SGLang applies RoPE)")
        if self._plan is None:
            raise RuntimeError("forward() before plan()")
        self._plan = replace(self._plan, causal=bool(causal), window_left=window_left,
                             logits_soft_cap=logits_soft_cap, sm_scale=sm_scale)
        return self.run(q, paged_kv_cache, k_scale=k_scale, v_scale=v_scale)
