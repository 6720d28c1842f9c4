"""Detector files: one safetensors file, never pickle.

Layout: the learned arrays as tensors ``state.<name>`` (a learned dict of arrays, such as a trained
network's weights, as ``state.<name>/<key>``); the backbone weights as ``weights.<name>``
only when the caller gave them (the bundled / torch-hub defaults are referenced by file name and
SHA-256 instead); metadata (all strings): ``format`` = ``anomalox-detector``, ``format_version``,
``anomalox_version``, ``class``, ``params`` and ``state`` (JSON), ``backbone`` (JSON: name and
weights reference) and ``checksum``, the SHA-256 of every tensor (name, dtype, shape, bytes) and
of the other metadata. Loading checks all of it before building anything.

Detectors are read and written through their public state contract only (``state_dict``,
``load_state_dict``, ``build_backbone``, ``get_params``); this module registers ``save`` as the
writer behind ``BaseDetector.save``, so detectors never import it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

import anomalox
from anomalox import detectors
from anomalox.detectors import BaseDetector
from anomalox.exceptions import ModelFileError
from anomalox.torch_backbone import ModuleBackbone
from anomalox.weights import read_state_dict, sha256_file

FORMAT = "anomalox-detector"
FORMAT_VERSION = "1"

__all__ = ["load", "save", "ModelFileError"]


def _checksum(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> str:
    digest = hashlib.sha256()
    for key in sorted(metadata):
        if key != "checksum":
            digest.update(f"{key}={metadata[key]}\n".encode())
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}:{arr.dtype.str}:{arr.shape}\n".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples they were saved from, at every depth (learned attributes hold
    tuples, never lists)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _array_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, np.ndarray) for v in value.values())


def _user_weights(weights: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().contiguous().numpy() for k, v in read_state_dict(weights).items()}


def save(detector: BaseDetector, path: str | os.PathLike[str]) -> str:
    """Write a fitted detector to `path` (one safetensors file); returns the path.

    Also ``detector.save(path)`` and ``anomalox.save(detector, path)``. Raises ``NotFittedError``
    before ``fit``, and ``ValueError`` when backbone parameters changed after ``fit``.
    """
    from safetensors.numpy import save_file

    fitted = detector.state_dict()
    params = detector.get_params(deep=False)
    tensors: dict[str, np.ndarray] = {}
    state: dict[str, Any] = {}
    for name, value in fitted.items():
        if isinstance(value, np.ndarray):
            tensors[f"state.{name}"] = np.ascontiguousarray(value)
        elif _array_dict(value):
            # A dict of arrays (a trained network's weights): one tensor per entry, "state.<name>/<key>".
            for key, array in value.items():
                tensors[f"state.{name}/{key}"] = np.ascontiguousarray(array)
        else:
            state[name] = _jsonable(value)
    backbone = detector.backbone_
    reference: dict[str, Any] = {"name": backbone.name, "layers": list(backbone.layers)}
    if isinstance(backbone, ModuleBackbone):
        # The module itself is never stored (nothing is pickled): its class and weights' digest,
        # checked against the module given to load.
        if callable(params.get("preprocessing")):
            raise ValueError(
                "preprocessing: a callable cannot be stored in a model file (nothing is ever pickled); give the "
                "module's (mean, std) instead, or keep the detector in memory"
            )
        reference.update(kind="module", **backbone.fingerprint())
        params["backbone"] = reference["class"]
    elif backbone.weights_path is not None:
        reference.update(
            kind="default",
            tag=params["weights"],
            file=os.path.basename(backbone.weights_path),
            sha256=sha256_file(backbone.weights_path),
        )
    else:
        reference["kind"] = "embedded"
        for k, v in _user_weights(params["weights"]).items():
            tensors[f"weights.{k}"] = v
    params["weights"] = None
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "anomalox_version": anomalox.__version__,
        "class": type(detector).__name__,
        "params": json.dumps({k: _jsonable(v) for k, v in params.items()}, sort_keys=True),
        "state": json.dumps(state, sort_keys=True),
        "backbone": json.dumps(reference, sort_keys=True),
    }
    metadata["checksum"] = _checksum(tensors, metadata)
    path = os.fspath(path)
    partial = path + ".partial"
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, path)
    return path


def _read(path: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no such model file: {path!r}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not looks_safetensors and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"):
        raise ModelFileError(
            f"{path!r} is a pickle / torch.save file, not an anomalox model (safetensors); "
            f"it is refused without being unpickled"
        )
    if not looks_safetensors or struct.unpack("<Q", head[:8])[0] > size - 8:
        raise ModelFileError(f"{path!r} is truncated or not a safetensors file ({size} bytes)")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ModelFileError(f"{path!r} is corrupt (its arrays do not match its header): {exc}") from exc
    return metadata, tensors


def load(path: str | os.PathLike[str], backbone: torch.nn.Module | None = None) -> BaseDetector:
    """Read a detector written by ``save``; it scores bit-identically to the saved one.

    Parameters
    ----------
    path : str or path
    backbone : torch.nn.Module, optional
        For a detector fitted with a torch module backbone: that module again (the file holds its
        class name and the SHA-256 of its state_dict, never the module). Refused when its class or
        weights differ, and when given for a file with a named backbone.

    Raises ``ModelFileError`` (a ValueError) for a pickle, a truncated or corrupt file, a wrong
    checksum, a format version this anomalox cannot read, or a module backbone that is missing or
    differs; nothing in the file is executed.
    """
    path = os.fspath(path)
    metadata, tensors = _read(path)
    if metadata.get("format") != FORMAT:
        raise ModelFileError(f"{path!r} is a safetensors file but not an anomalox detector (no format tag)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{path!r} has format version {metadata.get('format_version')!r} (written by anomalox "
            f"{metadata.get('anomalox_version')}); this anomalox {anomalox.__version__} reads version {FORMAT_VERSION}"
        )
    if metadata.get("checksum") != _checksum(tensors, metadata):
        raise ModelFileError(f"{path!r} fails its checksum: the file was corrupted or modified")
    cls = getattr(detectors, metadata.get("class", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, BaseDetector)):
        raise ModelFileError(f"{path!r} holds an unknown detector class {metadata.get('class')!r}")
    params = json.loads(metadata["params"])
    reference = json.loads(metadata["backbone"])
    if reference["kind"] == "module":
        if not isinstance(backbone, torch.nn.Module):
            raise ModelFileError(
                f"{path!r} was fitted with a torch module backbone ({reference['class']}); pass that module: "
                f"anomalox.load(path, backbone=module) (modules are never stored in model files)"
            )
        params["backbone"], params["weights"] = backbone, None
    elif backbone is not None:
        raise ValueError(
            f"backbone: {path!r} was fitted with the named backbone {reference['name']!r}; pass backbone= only "
            f"for a model fitted with a torch module"
        )
    elif reference["kind"] == "embedded":
        params["weights"] = {
            k[len("weights.") :]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("weights.")
        }
    else:
        params["weights"] = reference.get("tag")
    detector = cls(**params)
    built = detector.build_backbone()
    if list(built.layers) != reference["layers"]:
        raise ModelFileError(
            f"{path!r} was fitted on taps {reference['layers']}, but this anomalox resolves {list(built.layers)}"
        )
    if reference["kind"] == "module":
        found_print = built.fingerprint()
        if found_print != {"class": reference["class"], "sha256": reference["sha256"]}:
            raise ModelFileError(
                f"{path!r} was fitted with a {reference['class']} whose state_dict has sha256 "
                f"{reference['sha256'][:12]}…, but the module given is a {found_print['class']} with sha256 "
                f"{found_print['sha256'][:12]}…: not the same network"
            )
    found = built.weights_path
    if reference["kind"] == "default" and (found is None or sha256_file(found) != reference["sha256"]):
        raise ModelFileError(
            f"{path!r} was fitted with backbone weights {reference['file']} (sha256 {reference['sha256'][:12]}…), "
            f"but the file found here ({found}) differs"
        )
    state: dict[str, Any] = {name: _tuples(value) for name, value in json.loads(metadata["state"]).items()}
    for key, value in tensors.items():
        if not key.startswith("state."):
            continue
        name, _, entry = key[len("state.") :].partition("/")
        if entry:
            state.setdefault(name, {})[entry] = value
        else:
            state[name] = value
    try:
        return detector.load_state_dict(state, backbone=built)
    except ValueError as exc:
        raise ModelFileError(f"{path!r} does not hold the state of a {cls.__name__}: {exc}") from exc


BaseDetector.register_saver(save)
