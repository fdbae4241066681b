"""``shutdown_one``: one engine of a process that runs several is shut down alone, the others keep serving."""

from __future__ import annotations

import random
import time

import psutil
import pytest

from tests.test_holes_soak import SAMPLING

pytestmark = pytest.mark.engine


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_an_engine_shut_down_alone_ends_its_processes_and_no_others(engines, tiny_llama, tiny_engines):
    holes, cold = tiny_engines
    ids = [random.Random(7).randrange(3, 2000) for _ in range(120)]
    with engines.scoped(model_path=str(tiny_llama), skip_tokenizer_init=True, log_level="error", random_seed=0,
                        radix_cache_backend="holes", max_total_tokens=2000) as eng:
        ours = list(eng._scheduler_init_result.all_child_pids)
        others = [p for e in (holes, cold) for p in e._scheduler_init_result.all_child_pids]
        assert len(ours) >= 2 and all(map(_alive, ours + others))  # a scheduler and a detokenizer at least
        assert eng.generate(input_ids=ids, sampling_params=SAMPLING)["output_ids"]
    assert not any(map(_alive, ours))
    time.sleep(2.5)  # the others' watchdogs poll every second: a death they took for a crash would end this process
    assert all(map(_alive, others))
    assert holes.generate(input_ids=ids, sampling_params=SAMPLING)["output_ids"] == \
        cold.generate(input_ids=ids, sampling_params=SAMPLING)["output_ids"]
