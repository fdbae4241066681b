"""``ForwardBatch.init_new`` (AFTER hook): an extend batch's ``BatchHoles`` reaches its forward.

The extend hook's commit step (``patches/scheduler/extend.py``) leaves the batch's
``BatchHoles`` on the ``ScheduleBatch`` (``HOLES_ATTR``; every extend batch of a ``holes``
server gets one, written anew by each ``prepare_for_extend``). This hook, which SGLang runs
when it builds the forward from that batch, reads it without touching the ``ScheduleBatch``:

* checks that it describes this forward (request lengths and query counts; a stale or
  foreign one is an error, never a wrong answer);
* sets the forward's ``positions`` to the queries' original positions (RoPE) when the batch
  holds a fill;
* hands it to the model runner's hole-aware attention backend (``HoleBackend.receive``), which
  plans from it in ``init_forward_metadata``. SGLang's runners rebuild the ``ForwardBatch``
  field by field on its way to the model (``dataclasses.replace``), so nothing of ours rides
  on the forward batch itself. A batch holding a fill on a runner without a hole-aware backend
  is an error.
"""

from __future__ import annotations

from typing import Any

from sglang_holes.attention.batch_holes import BatchHoles
from sglang_holes.patches.attention.hole_backend import check_describes, hole_backend_of

HOLES_ATTR = "holes"  # ScheduleBatch -> its BatchHoles (set by the commit step, read here)


def holes_of_batch(batch: Any) -> BatchHoles | None:
    """The ``BatchHoles`` the commit step left on a ``ScheduleBatch`` (None: not a ``holes`` extend batch)."""
    holes = getattr(batch, HOLES_ATTR, None)
    return holes if isinstance(holes, BatchHoles) else None


def after_init_new(ret: Any, cls: Any, batch: Any, model_runner: Any, *_: Any, **__: Any) -> Any:
    holes = holes_of_batch(batch)
    if holes is None or not ret.forward_mode.is_extend():
        return ret
    check_describes(holes, ret)
    backend = hole_backend_of(model_runner)
    if backend is None:
        if holes.has_fill:
            raise RuntimeError(f"a batch with {holes.fills} hole fill(s) reached attention backend "
                               f"{type(model_runner.attn_backend).__name__}, which cannot run it")
        return ret
    if holes.has_fill:
        ret.positions = holes.positions.to(ret.seq_lens.device, non_blocking=True)
    backend.receive(holes)
    return ret

