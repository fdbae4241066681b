"""``HolesConfig``: every sglang-holes setting in one frozen, validated object.

This is the only module that reads the environment. The settings are read once where
a consumer is built (the ``holes`` cache factory and the hole-aware attention backends,
all in the scheduler process, all from the same environment) and passed down; nothing
else looks them up again.

=================================  =====================  ==================================================
variable                           default                meaning
=================================  =====================  ==================================================
``SGLANG_HOLES_EVICTION_POLICY``   ``lru-leaf``           ``lru-leaf`` (stock: leaves only) or ``cost-aware``
``SGLANG_HOLES_ATTENTION_PATH``    ``auto``               FlashInfer hole path: ``auto``, ``custom_mask``, ``spans``
``SGLANG_HOLES_MODE``              ``holes``              ``prefix-only``: benchmark baseline, reuse the
                                                          leading cached run only (like stock SGLang) through
                                                          the same hole-aware attention code
``SGLANG_HOLES_CACHE``             ``~/.cache/sglang-     where the embedded model is converted to
                                   holes``
=================================  =====================  ==================================================

``SGLANG_PLATFORM`` is SGLang's own variable; ``selected_platform`` / ``select_platform``
read and set it for the out-of-tree CPU platform (``patches/platform.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sglang_holes.cache.eviction import EVICTION_POLICIES

ENV_EVICTION_POLICY = "SGLANG_HOLES_EVICTION_POLICY"
ENV_ATTENTION_PATH = "SGLANG_HOLES_ATTENTION_PATH"
ENV_MODE = "SGLANG_HOLES_MODE"
ENV_MODEL_CACHE = "SGLANG_HOLES_CACHE"
ENV_PLATFORM = "SGLANG_PLATFORM"

ATTENTION_PATHS = ("auto", "custom_mask", "spans")
MODES = ("holes", "prefix-only")


@dataclass(frozen=True)
class HolesConfig:
    """What the ``holes`` cache and the hole-aware attention backends are told (validated).

    eviction_policy: a name registered in ``sglang_holes.cache.eviction.EVICTION_POLICIES``.
    attention_path: FlashInfer hole path, ``auto`` (the cost model picks per batch),
        ``custom_mask`` or ``spans``.
    mode: ``holes``, or ``prefix-only`` (benchmark baseline: every extend runs the hole
        attention code but only the leading cached run is reused).
    """

    eviction_policy: str = "lru-leaf"
    attention_path: str = "auto"
    mode: str = "holes"

    def __post_init__(self) -> None:
        _check(ENV_EVICTION_POLICY, self.eviction_policy, tuple(EVICTION_POLICIES), "an eviction policy")
        _check(ENV_ATTENTION_PATH, self.attention_path, ATTENTION_PATHS, "a FlashInfer hole path")
        _check(ENV_MODE, self.mode, MODES, "a mode")

    @property
    def prefix_only(self) -> bool:
        return self.mode == "prefix-only"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> HolesConfig:
        """Settings from ``environ`` (default: this process's environment); ``ValueError`` if one is bad."""
        env = os.environ if environ is None else environ
        return cls(eviction_policy=env.get(ENV_EVICTION_POLICY, cls.eviction_policy),
                   attention_path=env.get(ENV_ATTENTION_PATH, cls.attention_path),
                   mode=env.get(ENV_MODE, cls.mode))


def _check(variable: str, value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{variable}={value!r} is not {what}; expected one of {allowed}")


def model_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Folder of converted models: ``$SGLANG_HOLES_CACHE``, else ``$XDG_CACHE_HOME/sglang-holes``,
    else ``~/.cache/sglang-holes``."""
    env = os.environ if environ is None else environ
    if explicit := env.get(ENV_MODEL_CACHE):
        return Path(explicit).expanduser()
    xdg = env.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sglang-holes"


def selected_platform() -> str | None:
    """SGLang's ``SGLANG_PLATFORM`` (an out-of-tree platform chosen by name), or None."""
    return os.environ.get(ENV_PLATFORM) or None


def select_platform(name: str) -> None:
    """Select platform ``name`` for this process and every process it spawns (they inherit it)."""
    os.environ[ENV_PLATFORM] = name
