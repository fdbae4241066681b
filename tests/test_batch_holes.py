"""``BatchHoles``: built once by the commit step, handed to the forward and the backend explicitly.

The ``ForwardBatch.init_new`` hook runs here on SGLang's own ``ForwardBatch`` (``tests.backend_batches``)
with stand-ins for the ``ScheduleBatch`` and the model runner: what it hands over, what it refuses,
and that it leaves the ``ScheduleBatch`` as it found it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_holes.attention.batch_holes import BatchHoles
from sglang_holes.patches.attention.forward_batch import HOLES_ATTR, after_init_new
from sglang_holes.patches.attention.hole_backend import HoleBackend, hole_backend_of
from tests.backend_batches import hole_batch


class _Backend(HoleBackend):
    pass


def _runner(backend: object) -> SimpleNamespace:
    return SimpleNamespace(attn_backend=backend)


def test_build_validates_and_concatenates():
    holes = BatchHoles.build([3, 1], [10, 4], [torch.tensor([2, 3, 9]), torch.arange(1, 4)], fills=1)
    assert holes.positions.tolist() == [2, 3, 9, 1, 2, 3] and holes.num_queries == 6
    assert holes.extend_lens == (3, 3) and holes.spans() == [[(2, 4), (9, 10)], [(1, 4)]]
    assert holes.plan().num_queries == 6 and holes.has_fill
    table = holes.slot_table(torch.arange(80).view(8, 10))
    assert table[0].tolist() == list(range(30, 40)) and table[1].tolist() == [10, 11, 12, 13]
    with pytest.raises(ValueError, match="outside"):
        BatchHoles.build([0], [4], [torch.tensor([4])], fills=1)
    with pytest.raises(ValueError, match="rows"):
        BatchHoles.build([0, 1], [4], [torch.tensor([3])], fills=1)


def test_the_hook_hands_the_holes_to_the_backend_and_leaves_the_schedule_batch_alone():
    hb = hole_batch([37], [[(0, 3), (10, 15), (36, 37)]], seed=1)
    batch = SimpleNamespace(**{HOLES_ATTR: hb.holes})
    backend = _Backend()
    hb.fb.positions = torch.zeros_like(hb.fb.positions)  # SGLang's virtual positions, before the hook
    assert after_init_new(hb.fb, None, batch, _runner(backend)) is hb.fb
    assert getattr(batch, HOLES_ATTR) is hb.holes  # init_new does not mutate the ScheduleBatch
    assert torch.equal(hb.fb.positions, hb.holes.positions)  # RoPE at the original positions
    assert backend.take(hb.fb) is hb.holes and backend.take(hb.fb) is None  # taken once


def test_a_fill_without_a_hole_aware_backend_is_an_error():
    hb = hole_batch([12], [[(2, 4), (11, 12)]], seed=3)
    batch = SimpleNamespace(**{HOLES_ATTR: hb.holes})
    with pytest.raises(RuntimeError, match="cannot run it"):
        after_init_new(hb.fb, None, batch, _runner(object()))
    plain = hole_batch([10], [[(4, 10)]], seed=5)  # no fill: a stock backend is fine
    assert after_init_new(plain.fb, None, SimpleNamespace(**{HOLES_ATTR: plain.holes}), _runner(object())) is plain.fb


def test_holes_of_another_forward_are_refused():
    """A stale or foreign BatchHoles (another batch's lengths) is an error, never planned from."""
    hb = hole_batch([12], [[(2, 4), (11, 12)]], seed=3)
    other = hole_batch([12], [[(2, 5), (11, 12)]], seed=3)
    with pytest.raises(RuntimeError, match="does not describe"):
        after_init_new(hb.fb, None, SimpleNamespace(**{HOLES_ATTR: other.holes}), _runner(_Backend()))
    backend = _Backend()
    backend.receive(other.holes)
    with pytest.raises(RuntimeError, match="does not describe"):
        backend.take(hb.fb)


def test_the_hybrid_backend_hands_extends_to_its_prefill_backend():
    prefill = _Backend()
    assert hole_backend_of(_runner(SimpleNamespace(prefill_backend=prefill))) is prefill
    assert hole_backend_of(_runner(SimpleNamespace(prefill_backend=object()))) is None
