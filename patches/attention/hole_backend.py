"""``HoleBackend``: what the three hole-aware attention backends share.

Each is SGLang's own backend class with this mixin in front (``torch_native``, ``flashinfer``,
``fa3``). The ``ForwardBatch`` hook hands a batch's ``BatchHoles`` to the backend
(``receive``) just before SGLang plans the forward; ``init_forward_metadata`` takes it
(``take``, once) and plans from it, so no per-batch state is read from anywhere else.
"""

from __future__ import annotations

from typing import Any

from sglang_holes.attention.batch_holes import BatchHoles


class HoleBackend:
    """Mixin in front of an SGLang attention backend class (``class X(HoleBackend, SGLangBackend)``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._received: BatchHoles | None = None  # handed over by the ForwardBatch hook, taken once
        super().__init__(*args, **kwargs)

    def receive(self, holes: BatchHoles) -> None:
        """The next extend forward's ``BatchHoles`` (a later one replaces one never taken)."""
        self._received = holes

    def take(self, forward_batch: Any) -> BatchHoles | None:
        """The ``BatchHoles`` of this forward, or None (not an extend built from a ``holes`` batch:
        e.g. SGLang's start-up profiling). ``RuntimeError`` if the one received describes another forward."""
        holes, self._received = self._received, None
        if holes is None or not forward_batch.forward_mode.is_extend():
            return None
        check_describes(holes, forward_batch)
        return holes


def hole_backend_of(model_runner: Any) -> HoleBackend | None:
    """The runner's backend that runs extends, if it is hole-aware (SGLang's hybrid backend: its prefill one)."""
    backend = getattr(model_runner, "attn_backend", None)
    for candidate in (backend, getattr(backend, "prefill_backend", None)):
        if isinstance(candidate, HoleBackend):
            return candidate
    return None


def check_describes(holes: BatchHoles, forward_batch: Any) -> None:
    """``RuntimeError`` unless ``holes`` has this forward's requests: the same lengths and query counts
    (host fields only: nothing here waits for the device)."""
    seq_lens = tuple(int(n) for n in forward_batch.seq_lens_cpu.tolist())
    extend = tuple(int(m) for m in forward_batch.extend_seq_lens_cpu)
    if seq_lens != holes.seq_lens or extend != holes.extend_lens:
        raise RuntimeError(f"the batch's hole state (lengths {holes.seq_lens}, queries {holes.extend_lens}) does not "
                           f"describe its forward (lengths {seq_lens}, queries {extend})")
