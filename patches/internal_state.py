"""Report sglang-holes in the scheduler's internal state (``/get_server_info``).

An AFTER hook on ``SchedulerInternalStateController.get_internal_state`` adds a
``"sglang_holes"`` entry, computed inside the scheduler process. It is how a
user (and the smoke test) sees that the plugin really was loaded by SGLang in the
spawned scheduler, not only in the process that started it. Read-only: it adds
one informational key and changes no behaviour.
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGET = (
    "sglang.srt.managers.scheduler_components.internal_state."
    "SchedulerInternalStateController.get_internal_state"
)


def plugin_state() -> dict[str, Any]:
    from sglang.srt.platforms import current_platform

    return {
        "version": metadata.version("sglang-holes"),
        "pid": os.getpid(),
        "platform": type(current_platform).__name__,
    }


def _after_get_internal_state(result: Any, *_args: Any, **_kwargs: Any) -> Any:
    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        state["sglang_holes"] = plugin_state()
    return result


def register() -> None:
    HookRegistry.register(TARGET, _after_get_internal_state, HookType.AFTER)
