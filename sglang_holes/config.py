"""``HolesConfig``: every sglang-holes setting in one frozen, validated object.

This is the only module that reads the environment. The settings are read once where
a consumer is built (the ``holes`` cache factory and the hole-aware attention backends,
all in the scheduler process, all from the same environment) and passed down; nothing
else looks them up again.

The eviction policy comes from SGLang's own flags, ``--radix-eviction-policy`` (``cost-aware``
by default with the ``holes`` cache; ``priority-cost``; SGLang's own ``lru``, ``lfu``, ``slru``,
``priority``, leaves only, as SGLang evicts them; ``lru-leaf``) and ``--radix-eviction-policy-config``
(its parameters, e.g. ``{"decay": 16}``, which fixes ``cost-aware``'s decay instead of letting its
shadow caches choose among 2, 8, 32 and 128 ticks).

=================================  =====================  ==================================================
variable                           default                meaning
=================================  =====================  ==================================================
``SGLANG_HOLES_ATTENTION_PATH``    ``auto``               FlashInfer hole path: ``auto``, ``custom_mask``, ``spans``
``SGLANG_HOLES_MODE``              ``holes``              ``prefix-only``: benchmark baseline, reuse the
                                                          leading cached run only (like stock SGLang) through
                                                          the same hole-aware attention code
``SGLANG_HOLES_CACHE``             ``~/.cache/sglang-     where the embedded model is converted to
                                   holes``
``SGLANG_HOLES_CHUNK_STORE_TOKENS`` unset                  the chunk store's capacity in tokens (unset: bounded
                                                          only by the KV pool, which evicts it under pressure)
``SGLANG_HOLES_CHUNK_STORE_POLICY`` ``frequency``         what the chunk store keeps: ``frequency`` (use counts
                                                          with aging, TinyLFU admission) or ``lru``
``SGLANG_HOLES_CHUNK_SINK_TOKENS`` ``4``                  a prompt's first positions never served from chunk
                                                          KV computed elsewhere (the attention sink; >= 1)
``SGLANG_HOLES_CHECK_INTEGRITY``   ``0``                  ``1``: audit the KV pool's ownership at every
                                                          scheduler step and stop loudly on a broken pool
                                                          (tests and soaks; O(pool) per step)
=================================  =====================  ==================================================

``SGLANG_PLATFORM`` is SGLang's own variable; ``selected_platform`` / ``select_platform``
read and set it for the out-of-tree CPU platform (``patches/launch/platform.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sglang_holes.cache.eviction import EVICTION_POLICIES, POLICY_PARAMS, make_policy

FLAG_EVICTION_POLICY = "--radix-eviction-policy"
# SGLang's flag value -> HoleTree's policy (its other policies have no hole-aware version).
SGLANG_POLICY_NAMES: dict[str, str] = {}  # every SGLang policy the holes cache runs has its own name
ENV_ATTENTION_PATH = "SGLANG_HOLES_ATTENTION_PATH"
ENV_MODE = "SGLANG_HOLES_MODE"
ENV_MODEL_CACHE = "SGLANG_HOLES_CACHE"
ENV_PLATFORM = "SGLANG_PLATFORM"
ENV_CHECK_INTEGRITY = "SGLANG_HOLES_CHECK_INTEGRITY"
ENV_CHUNK_STORE_TOKENS = "SGLANG_HOLES_CHUNK_STORE_TOKENS"
ENV_CHUNK_STORE_POLICY = "SGLANG_HOLES_CHUNK_STORE_POLICY"
CHUNK_STORE_POLICIES = ("frequency", "lru")
ENV_CHUNK_SINK_TOKENS = "SGLANG_HOLES_CHUNK_SINK_TOKENS"
# Measured on MuSiQue with documents-first prompts (benchmarks/results/sink.md): 1 already removes the
# damage of a moved first token; a few more buy a little more at negligible cost.
SINK_TOKENS = 4

ATTENTION_PATHS = ("auto", "custom_mask", "spans")
MODES = ("holes", "prefix-only")


@dataclass(frozen=True)
class HolesConfig:
    """What the ``holes`` cache and the hole-aware attention backends are told (validated).

    eviction_policy: a name registered in ``sglang_holes.cache.eviction.EVICTION_POLICIES``.
    eviction_params: the policy's parameters, as ``(name, value)`` pairs (``cost-aware``: ``decay``, one
        fixed decay time in ticks instead of the shadow caches' choice).
    attention_path: the hole attention strategy, ``auto`` (chosen per batch), ``custom_mask`` (one
        masked launch per sequence) or ``spans`` (mask-free per run of missing tokens); on
        FlashInfer the two plans of that name, on CPU (``sdpa``) one masked SDPA call vs two
        mask-free fused calls per run merged by log-sum-exp.
    mode: ``holes``, or ``prefix-only`` (benchmark baseline: every extend runs the hole
        attention code but only the leading cached run is reused).
    check_integrity: audit the pool's slot ownership at every scheduler step
        (``patches/scheduler/pool_audit.py``); off by default.
    chunk_store_tokens: the chunk store's capacity in tokens (None: bounded by the KV pool only).
    chunk_store_policy: what the chunk store keeps (``sglang_holes.chunks.store``).
    chunk_sink_tokens: a prompt's first positions that chunk reuse never serves from KV computed at
        another position or after other tokens (the attention sink, ``chunks.hints.Sink``); >= 1.
    """

    eviction_policy: str = "cost-aware"
    attention_path: str = "auto"
    mode: str = "holes"
    eviction_params: tuple[tuple[str, float], ...] = ()
    check_integrity: bool = False
    chunk_store_tokens: int | None = None
    chunk_store_policy: str = "frequency"
    chunk_sink_tokens: int = SINK_TOKENS

    def __post_init__(self) -> None:
        _check(FLAG_EVICTION_POLICY, self.eviction_policy, tuple(EVICTION_POLICIES),
               "an eviction policy of the holes cache")
        allowed = POLICY_PARAMS.get(self.eviction_policy, ())
        for name, value in self.eviction_params:
            if name not in allowed:
                raise ValueError(f"--radix-eviction-policy-config: {self.eviction_policy} takes {list(allowed)}, "
                                 f"not {name!r}")
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"--radix-eviction-policy-config: {name} must be a number > 0, got {value!r}")
        try:  # what only the policy knows (slru's threshold >= 1, no switch_confidence with a fixed decay)
            make_policy(self.eviction_policy, None, **dict(self.eviction_params))
        except ValueError as e:
            raise ValueError(f"--radix-eviction-policy-config: {e}") from None
        _check(ENV_ATTENTION_PATH, self.attention_path, ATTENTION_PATHS, "a FlashInfer hole path")
        _check(ENV_MODE, self.mode, MODES, "a mode")
        _check(ENV_CHUNK_STORE_POLICY, self.chunk_store_policy, CHUNK_STORE_POLICIES, "a chunk store policy")
        tokens = self.chunk_store_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"{ENV_CHUNK_STORE_TOKENS}={tokens!r} must be a positive number of tokens")
        sink = self.chunk_sink_tokens
        if isinstance(sink, bool) or not isinstance(sink, int) or sink < 1:
            raise ValueError(f"{ENV_CHUNK_SINK_TOKENS}={sink!r} must be a number of tokens >= 1 (position 0 is "
                             "always the attention sink)")
        if not isinstance(self.check_integrity, bool):
            raise ValueError(f"check_integrity must be a bool, got {self.check_integrity!r}")

    @property
    def prefix_only(self) -> bool:
        return self.mode == "prefix-only"

    @classmethod
    def build(cls, server_args: Any = None, environ: Mapping[str, str] | None = None) -> HolesConfig:
        """Settings from SGLang's server arguments (``radix_eviction_policy``,
        ``radix_eviction_policy_config``) and ``environ`` (default: this process's environment).
        ``ValueError`` naming the flag or variable if one is bad."""
        env = os.environ if environ is None else environ
        policy = getattr(server_args, "radix_eviction_policy", None) or cls.eviction_policy
        params = getattr(server_args, "radix_eviction_policy_config", None) or {}
        if not isinstance(params, Mapping):
            raise ValueError(f"--radix-eviction-policy-config must be a JSON object, got {params!r}")
        return cls(eviction_policy=SGLANG_POLICY_NAMES.get(policy, policy),
                   attention_path=env.get(ENV_ATTENTION_PATH, cls.attention_path),
                   mode=env.get(ENV_MODE, cls.mode), eviction_params=tuple(sorted(params.items())),
                   check_integrity=_flag(ENV_CHECK_INTEGRITY, env.get(ENV_CHECK_INTEGRITY, "0")),
                   chunk_store_tokens=_tokens(ENV_CHUNK_STORE_TOKENS, env.get(ENV_CHUNK_STORE_TOKENS)),
                   chunk_store_policy=env.get(ENV_CHUNK_STORE_POLICY, cls.chunk_store_policy),
                   chunk_sink_tokens=_tokens(ENV_CHUNK_SINK_TOKENS, env.get(ENV_CHUNK_SINK_TOKENS),
                                             cls.chunk_sink_tokens))


def _tokens(variable: str, value: str | None, default: int | None = None) -> int | None:
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{variable}={value!r} must be a positive number of tokens") from None


def _flag(variable: str, value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError(f"{variable}={value!r} must be 0 or 1")
    return value == "1"


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
