"""``sglang_holes.Engine``: a drop-in ``sglang.Engine`` with sglang-holes loaded.

Differences from ``sglang.Engine``, each yielding to an explicit argument:
* the SGLang version is checked first (another release is refused);
* ``model_path`` defaults to the embedded SmolLM2-135M-Instruct (prepared on first use);
  a given local folder is validated before SGLang sees it;
* without a GPU, the plain-CPU defaults of ``patches/launch.py`` apply.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.entrypoints.engine import Engine as SGLangEngine

from sglang_holes.model import resolve_model_path
from sglang_holes.patches.launch import apply_engine_defaults
from sglang_holes.patches.version import check_sglang_version


class Engine(SGLangEngine):
    """``sglang.Engine`` with the sglang-holes defaults (see module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        check_sglang_version()
        if "server_args" not in kwargs:
            kwargs["model_path"] = resolve_model_path(kwargs.get("model_path"))
            kwargs = apply_engine_defaults(kwargs)
        super().__init__(**kwargs)
