"""``HolesConfig``: one frozen, validated settings object; the only reader of the environment."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from sglang_holes import HolesConfig
from sglang_holes.config import model_cache_dir


def test_defaults_and_environment():
    assert HolesConfig.from_environ({}) == HolesConfig("lru-leaf", "auto", "holes")
    cfg = HolesConfig.from_environ({"SGLANG_HOLES_EVICTION_POLICY": "cost-aware",
                                    "SGLANG_HOLES_ATTENTION_PATH": "spans", "SGLANG_HOLES_MODE": "prefix-only"})
    assert (cfg.eviction_policy, cfg.attention_path, cfg.prefix_only) == ("cost-aware", "spans", True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mode = "holes"


@pytest.mark.parametrize("variable, value, message", [
    ("SGLANG_HOLES_EVICTION_POLICY", "lfu", "not an eviction policy"),
    ("SGLANG_HOLES_ATTENTION_PATH", "ragged", "not a FlashInfer hole path"),
    ("SGLANG_HOLES_MODE", "fast", "not a mode"),
])
def test_bad_settings_are_refused_with_the_variable_named(variable, value, message):
    with pytest.raises(ValueError, match=f"{variable}='{value}' is {message}"):
        HolesConfig.from_environ({variable: value})


def test_model_cache_dir():
    assert model_cache_dir({"SGLANG_HOLES_CACHE": "/x/y"}) == pathlib.Path("/x/y")
    assert model_cache_dir({"XDG_CACHE_HOME": "/c"}) == pathlib.Path("/c/sglang-holes")


def test_no_other_module_reads_the_environment():
    """``sglang_holes/config.py`` is the one place settings come from."""
    root = pathlib.Path(__file__).resolve().parents[1]
    readers = [p.relative_to(root).as_posix() for d in ("sglang_holes", "patches") for p in (root / d).rglob("*.py")
               if ("os.environ" in p.read_text() or "getenv" in p.read_text()) and p.name != "config.py"]
    assert readers == []
