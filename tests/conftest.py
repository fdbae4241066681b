"""Shared fixtures. The real SGLang engine and the embedded model start once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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


@pytest.fixture(scope="session")
def engine(embedded_model: Path) -> Iterator[object]:
    """One real SGLang engine (CPU, torch_native, fp32) with SGLang's OWN radix cache (the
    reference for cold and stock runs), plugin loaded, for the whole session."""
    import sglang_holes

    eng = sglang_holes.Engine(model_path=str(embedded_model), log_level="error", random_seed=0,
                              radix_cache_backend=None)
    try:
        yield eng
    finally:
        eng.shutdown()


@pytest.fixture(scope="session")
def tokenizer(embedded_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_model))
