"""Shared fixtures. The real SGLang engine and the embedded model start once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Every engine and server a test starts audits its KV pool's ownership at every scheduler step
# (patches/scheduler/pool_audit.py): a slot owned twice or leaked stops the scheduler at the step that broke it.
os.environ.setdefault("SGLANG_HOLES_CHECK_INTEGRITY", "1")


# Modules that start HTTP servers of their own (and stop them): they run first, before the session's
# engines (kept up until the session ends, see ``Engines``) hold most of a 24 GiB machine's memory.
RUN_FIRST = ("test_server.py", "test_load_soak.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in RUN_FIRST)  # stable: file order kept otherwise
    if os.environ.get("SGLANG_HOLES_NIGHTLY") == "1":
        return
    skip = pytest.mark.skip(reason="nightly-size profile: set SGLANG_HOLES_NIGHTLY=1")
    for item in items:
        if "nightly" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The float32 embedded SmolLM2 folder (converted on first use, then reused)."""
    from sglang_holes.model import prepare_embedded_model

    return prepare_embedded_model(progress=False)


class Engines:
    """Every engine of the session, shut down together at its end, or one alone with ``scoped``.

    ``sglang.Engine.shutdown()`` kills all SGLang subprocesses of the process (other
    engines included), so the session's engines are shut down together
    (``sglang_holes.patches.launch.engine.shutdown_all`` stops every watchdog first). An engine
    one module or test needs is started with ``scoped`` and ended alone (``shutdown_one``) when
    it is done: kept to the session's end, they held more than a 24 GiB machine has.
    """

    # The session's four (engine, holes_engine, tiny_engines) and two of one module: each holds 1.5-3 GB.
    MAX_LIVE = 6

    def __init__(self) -> None:
        self.live: list[object] = []

    def start(self, env: dict[str, str] | None = None, **kwargs: object) -> object:
        """``sglang_holes.Engine(**kwargs)``, with ``env`` set while its scheduler starts."""
        import sglang_holes

        if len(self.live) >= self.MAX_LIVE:
            raise RuntimeError(f"{len(self.live)} engines already up: start a module's or a test's engine with "
                               "Engines.scoped, which ends it when it is done")
        old = {k: os.environ.get(k) for k in env or {}}
        os.environ.update(env or {})
        try:
            eng = sglang_holes.Engine(**kwargs)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.live.append(eng)
        return eng

    @contextmanager
    def scoped(self, env: dict[str, str] | None = None, **kwargs: object) -> Iterator[object]:
        """``start``, then shut that engine down alone when the block ends, checking that its processes
        are gone. That the others are not is checked by every later test that uses them (a watchdog
        that took this shutdown for a crash would end the whole test process)."""
        from sglang_holes.patches.launch.engine import shutdown_one

        eng = self.start(env, **kwargs)
        pids = list(eng._scheduler_init_result.all_child_pids)
        assert len(pids) >= 2  # a scheduler and a detokenizer at least
        try:
            yield eng
        finally:
            self.live.remove(eng)
            shutdown_one(eng)
            assert not any(map(_alive, pids)), "shutdown_one left a process of its engine running"


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="session")
def engines() -> Iterator[Engines]:
    from sglang_holes.patches.launch.engine import shutdown_all

    pool = Engines()
    try:
        yield pool
    finally:
        shutdown_all(pool.live)


@pytest.fixture(scope="session")
def engine(engines: Engines, embedded_model: Path) -> object:
    """One real SGLang engine (CPU, torch_native, fp32) with SGLang's OWN radix cache (the
    reference for cold and stock runs), plugin loaded, for the whole session."""
    return engines.start(model_path=str(embedded_model), log_level="error", random_seed=0, radix_cache_backend=None,
                         max_total_tokens=16384)  # engines live until the session ends: keep each one small


@pytest.fixture(scope="session")
def holes_engine(engines: Engines, embedded_model: Path) -> object:
    """The embedded model on the ``holes`` cache (cost-aware eviction, a small pool); chunk mode on."""
    # The chunk size that made SGLang's CPU memory fraction negative (a CPU default fixes it).
    return engines.start(model_path=str(embedded_model), log_level="error", radix_cache_backend="holes",
                         radix_eviction_policy="cost-aware", max_total_tokens=3400, random_seed=0,
                         chunked_prefill_size=16384)


@pytest.fixture(scope="session")
def tokenizer(embedded_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_model))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random-weight Llama (4 layers, GQA 4/2 heads, head_dim 32), saved locally, for fast engine soaks.

    ``initializer_range=0.2`` (not 0.02) makes its logits peaked, so greedy choices are
    separated by far more than float32 rounding and a cold-run comparison is decisive.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      initializer_range=0.2, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path, safe_serialization=True)
    return path


TINY_POOL = 2600  # ~6 of the soak's ~400-token prompts: constant eviction


@pytest.fixture(scope="session")
def tiny_engines(engines, tiny_llama: Path) -> tuple[object, object]:
    common = dict(model_path=str(tiny_llama), skip_tokenizer_init=True, log_level="error", random_seed=0)
    holes = engines.start(radix_cache_backend="holes", radix_eviction_policy="cost-aware",
                          max_total_tokens=TINY_POOL, **common)
    cold = engines.start(radix_cache_backend=None, disable_radix_cache=True, max_total_tokens=8192, **common)
    return holes, cold
