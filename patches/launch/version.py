"""The SGLang release sglang-holes supports, and the start-up check that enforces it.

Every patch here is written against SGLang 0.5.23's internals (the touch-points are
listed in ``patches/launch/hooks.py``; docs/sglang-integration.md); another release may move
them silently, so start-up refuses it instead of guessing.
"""

from __future__ import annotations

from importlib import metadata

SUPPORTED_SGLANG = "0.5.23"


class UnsupportedSGLangError(RuntimeError):
    pass


def installed_sglang_version() -> str | None:
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def check_sglang_version(found: str | None = None) -> None:
    """Raise ``UnsupportedSGLangError`` unless the installed SGLang is exactly the pinned release."""
    found = installed_sglang_version() if found is None else found
    if found != SUPPORTED_SGLANG:
        raise UnsupportedSGLangError(
            f"sglang-holes {metadata.version('sglang-holes')} supports sglang=={SUPPORTED_SGLANG} only, "
            f"but {'no sglang' if found is None else f'sglang=={found}'} is installed. "
            f"Install the supported release: pip install 'sglang=={SUPPORTED_SGLANG}'"
        )
