"""What the plain-CPU support relies on in SGLang 0.5.23. If a future SGLang changes
any of it, these fail loudly (and start-up refuses another version anyway)."""

from __future__ import annotations

import importlib.metadata as md
import inspect
import subprocess
import sys

import pytest


def test_pinned_version_is_installed():
    from sglang_holes.patches.launch.version import SUPPORTED_SGLANG, check_sglang_version

    assert md.version("sglang") == SUPPORTED_SGLANG
    check_sglang_version()


def test_other_versions_are_refused():
    from sglang_holes.patches.launch.version import UnsupportedSGLangError, check_sglang_version

    with pytest.raises(UnsupportedSGLangError, match=r"supports sglang==0\.5\.23 only.*sglang==0\.5\.24"):
        check_sglang_version("0.5.24")
    # `None` means "look it up"; an absent sglang is reported as such:
    import sglang_holes.patches.launch.version as v

    orig = v.installed_sglang_version
    try:
        v.installed_sglang_version = lambda: None
        with pytest.raises(UnsupportedSGLangError, match="no sglang is installed"):
            v.check_sglang_version()
    finally:
        v.installed_sglang_version = orig


def test_plugin_disables_itself_on_another_version(monkeypatch, caplog):
    from sglang.srt.plugins.hook_registry import HookRegistry

    import sglang_holes.patches.launch.plugin as plugin
    import sglang_holes.patches.launch.version as v

    monkeypatch.setattr(v, "installed_sglang_version", lambda: "0.4.0")
    before = {k: list(h) for k, h in HookRegistry._hooks.items()}
    with caplog.at_level("ERROR", logger="sglang_holes"):
        plugin.load()
    assert "plugin disabled" in caplog.text
    assert {k: list(h) for k, h in HookRegistry._hooks.items()} == before


def test_entry_points_are_registered():
    eps = {(e.group, e.name): e.value for e in md.distribution("sglang-holes").entry_points}
    assert eps[("sglang.srt.plugins", "sglang_holes")] == "sglang_holes.patches.launch.plugin:load"
    assert eps[("sglang.srt.platforms", "holes_cpu")] == "sglang_holes.patches.launch.platform:activate"


def test_rotary_vllm_import_is_still_guarded_by_out_of_tree():
    """The one import that breaks plain-CPU start-up, and the guard we rely on to skip it."""
    from sglang.srt.layers.rotary_embedding import base

    src = inspect.getsource(base.RotaryEmbedding.__init__)
    assert "from vllm._custom_ops import rotary_embedding" in src
    guard = src[: src.index("from vllm._custom_ops import rotary_embedding")]
    assert "not (current_platform.is_out_of_tree())" in guard


def test_platform_activation_is_opt_in(monkeypatch):
    from sglang_holes.patches.launch import platform

    monkeypatch.delenv("SGLANG_PLATFORM", raising=False)
    assert platform.activate() is None  # installed but not selected: SGLang is unchanged
    monkeypatch.setenv("SGLANG_PLATFORM", "something_else")
    assert platform.activate() is None


def test_selected_platform_is_sglang_cpu_marked_out_of_tree():
    """In a fresh process (SGLang resolves the platform once per process)."""
    code = (
        "from sglang.srt.platforms import current_platform as p\n"
        "from sglang.srt.platforms.cpu import CpuSRTPlatform\n"
        "print(type(p).__name__, p.is_out_of_tree(), isinstance(p, CpuSRTPlatform), p.device_type,"
        " p.get_torch_distributed_backend_str())\n"
    )
    import os

    import torch

    if torch.cuda.is_available():
        pytest.skip("the plain-CPU platform refuses to activate where CUDA is present")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, SGLANG_PLATFORM="holes_cpu"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["HolesCpuPlatform", "True", "True", "cpu", "gloo"]


def test_core_never_imports_sglang():
    code = (
        "import sys, pkgutil, importlib, sglang_holes\n"
        "for m in pkgutil.walk_packages(sglang_holes.__path__, 'sglang_holes.'):\n"
        "    if not m.name.startswith('sglang_holes.patches'): importlib.import_module(m.name)\n"
        "assert 'sglang_holes.cache.tree' in sys.modules and 'sglang_holes.chunks.deviation' in sys.modules\n"
        "bad = sorted(k for k in sys.modules if k == 'sglang' or k.startswith('sglang.'))\n"
        "print(bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
