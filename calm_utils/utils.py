"""Small shared helpers: seeds, the artefact cache, atomic writes, device choice."""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


DEFAULT_MODEL = "smollm2-135m"


def study_model() -> str:
    """The study's decoder-only model: ``$CALM_MODEL`` (any Hugging Face id or local folder of a Llama-family
    decoder) or, by default, ``smollm2-135m``. The one parameter to change to rerun the study on another model
    (on a GPU it goes to CUDA automatically); its tables then go to ``figures/<model>/``."""
    return os.environ.get("CALM_MODEL", "").strip() or DEFAULT_MODEL


def model_slug(name: str) -> str:
    """A file-system-safe short name of a model id (``Qwen/Qwen2.5-0.5B`` -> ``qwen2.5-0.5b``)."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name.rstrip("/").split("/")[-1].lower())


def scale_layer(layer: int, num_layers: int, reference_layers: int = 30) -> int:
    """A layer index chosen for the 30-layer SmolLM2, moved to the same relative depth of a model with
    ``num_layers`` layers (identity for 30), kept in 1..num_layers."""
    return max(1, min(num_layers, round(layer * num_layers / reference_layers)))


def set_seed(seed: int = 0) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def cache_dir(*parts: str) -> Path:
    """The git-ignored artefact cache (``$CALM_CACHE_DIR`` or ``<repo>/.cache``), created on demand."""
    root = Path(os.environ.get("CALM_CACHE_DIR", REPO_ROOT / ".cache"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_hash(obj: Any, n: int = 10) -> str:
    """A short stable hash of a JSON-serialisable config, used to name cached artefacts."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def smoke_mode() -> bool:
    """True when ``CALM_SMOKE`` is set to a truthy value (CI runs notebooks this way)."""
    return os.environ.get("CALM_SMOKE", "0").lower() not in ("", "0", "false", "no")
