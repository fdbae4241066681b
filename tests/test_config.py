"""``HolesConfig``: one frozen, validated settings object; the only reader of the environment."""

from __future__ import annotations

import dataclasses
import pathlib
from types import SimpleNamespace

import pytest

from sglang_holes import HolesConfig
from sglang_holes.config import model_cache_dir


def test_defaults_flags_and_environment():
    assert HolesConfig.build(None, {}) == HolesConfig("cost-aware", "auto", "holes")
    args = SimpleNamespace(radix_eviction_policy="lru", radix_eviction_policy_config=None)
    cfg = HolesConfig.build(args, {"SGLANG_HOLES_ATTENTION_PATH": "spans", "SGLANG_HOLES_MODE": "prefix-only"})
    assert (cfg.eviction_policy, cfg.attention_path, cfg.prefix_only) == ("lru", "spans", True)
    tuned = HolesConfig.build(SimpleNamespace(radix_eviction_policy="cost-aware",
                                              radix_eviction_policy_config={"decay": 64}), {})
    assert tuned.eviction_params == (("decay", 64),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mode = "holes"


@pytest.mark.parametrize("args, env, message", [
    ({"radix_eviction_policy": "tlru"}, {}, "--radix-eviction-policy='tlru' is not an eviction policy"),
    ({"radix_eviction_policy": "slru", "radix_eviction_policy_config": {"decay": 2}}, {},
     "takes \\['protected_threshold'\\]"),
    ({"radix_eviction_policy_config": {"threshold": 3}}, {},
     "takes \\['decay', 'switch_confidence'\\], not 'threshold'"),
    ({"radix_eviction_policy_config": {"decay": -1}}, {}, "decay must be a number > 0"),
    ({"radix_eviction_policy": "lru", "radix_eviction_policy_config": {"decay": 2}}, {}, "takes \\[\\]"),
    ({"radix_eviction_policy_config": {"decay": 8, "switch_confidence": 2}}, {},
     "switch_confidence applies to the decay duel: not with one fixed decay"),
    ({"radix_eviction_policy": "slru", "radix_eviction_policy_config": {"protected_threshold": 0.5}}, {},
     "protected_threshold must be >= 1"),
    ({}, {"SGLANG_HOLES_ATTENTION_PATH": "ragged"}, "SGLANG_HOLES_ATTENTION_PATH='ragged' is not a FlashInfer"),
    ({}, {"SGLANG_HOLES_MODE": "fast"}, "SGLANG_HOLES_MODE='fast' is not a mode"),
])
def test_bad_settings_are_refused_naming_the_flag_or_variable(args, env, message):
    with pytest.raises(ValueError, match=message):
        HolesConfig.build(SimpleNamespace(**args), env)


def test_model_cache_dir():
    assert model_cache_dir({"SGLANG_HOLES_CACHE": "/x/y"}) == pathlib.Path("/x/y")
    assert model_cache_dir({"XDG_CACHE_HOME": "/c"}) == pathlib.Path("/c/sglang-holes")


def test_no_other_module_reads_the_environment():
    """``sglang_holes/config.py`` is the one place settings come from."""
    root = pathlib.Path(__file__).resolve().parents[1]
    readers = [p.relative_to(root).as_posix() for d in ("sglang_holes", "patches") for p in (root / d).rglob("*.py")
               if ("os.environ" in p.read_text() or "getenv" in p.read_text()) and p.name != "config.py"]
    assert readers == []


def test_chunk_store_settings():
    from sglang_holes.config import HolesConfig

    config = HolesConfig.build(None, {"SGLANG_HOLES_CHUNK_STORE_TOKENS": "20000",
                                      "SGLANG_HOLES_CHUNK_STORE_POLICY": "lru"})
    assert (config.chunk_store_tokens, config.chunk_store_policy) == (20000, "lru")
    default = HolesConfig.build(None, {})
    assert (default.chunk_store_tokens, default.chunk_store_policy) == (None, "frequency")
    for env, message in (({"SGLANG_HOLES_CHUNK_STORE_TOKENS": "lots"}, "positive number of tokens"),
                         ({"SGLANG_HOLES_CHUNK_STORE_TOKENS": "0"}, "positive number of tokens"),
                         ({"SGLANG_HOLES_CHUNK_STORE_POLICY": "lfu"}, "SGLANG_HOLES_CHUNK_STORE_POLICY='lfu'")):
        with pytest.raises(ValueError, match=message):
            HolesConfig.build(None, env)


def test_the_attention_sink_setting():
    from sglang_holes.config import SINK_TOKENS, HolesConfig

    assert HolesConfig.build(None, {}).chunk_sink_tokens == SINK_TOKENS >= 1
    assert HolesConfig.build(None, {"SGLANG_HOLES_CHUNK_SINK_TOKENS": "16"}).chunk_sink_tokens == 16
    for value in ("0", "-1", "few"):  # position 0 is always the sink: no setting turns the rule off
        with pytest.raises(ValueError, match="SGLANG_HOLES_CHUNK_SINK_TOKENS"):
            HolesConfig.build(None, {"SGLANG_HOLES_CHUNK_SINK_TOKENS": value})

