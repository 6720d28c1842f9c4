"""Modules talk through each other's public names only.

A module of the package never imports another module's private (``_``-prefixed) names, nor a
private module object (``from anomalox import _convert``, ``import anomalox._convert``); the one
exception is the compiled ``anomalox._core``, imported by the modules that wrap it. Public names of
a package-internal module (``from anomalox._convert import as_float32``,
``from anomalox.detectors._base import BaseDetector``) are its contract with the package and are
allowed. Checked on the source with ``ast``, so it holds for code paths the other tests do not run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "anomalox"

# The modules that wrap the compiled extension (they turn its raw results into the public API).
CORE_WRAPPERS = {"anomalox", "anomalox.ops", "anomalox.metrics", "anomalox.backbone"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` reads from (resolving relative imports)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(path: Path) -> list[str]:
    """``module: from X import _name`` (or ``import X._y``) lines that reach into another module."""
    module = _module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _absolute(module, node, path.name == "__init__.py")
            if not source.startswith("anomalox"):
                continue
            for alias in node.names:
                target = f"{source}.{alias.name}"
                if target == "anomalox._core" and module in CORE_WRAPPERS:
                    continue
                if source == "anomalox._core" and module in CORE_WRAPPERS:
                    continue
                # A package may re-export from its own private submodules (detectors/__init__).
                if _private(alias.name) and source != module:
                    found.append(f"{module}:{node.lineno}: from {source} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "anomalox" and any(_private(p) for p in parts[1:]):
                    found.append(f"{module}:{node.lineno}: import {alias.name}")
    return found


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_the_package_sources_are_found():
    names = {_module_name(p) for p in _sources()}
    assert {"anomalox", "anomalox.ops", "anomalox.persist", "anomalox.detectors"} <= names


@pytest.mark.parametrize("path", _sources(), ids=lambda p: _module_name(p))
def test_no_module_imports_another_modules_private_names(path):
    assert private_imports(path) == []


def test_the_check_catches_a_private_import(tmp_path, monkeypatch):
    fake = PACKAGE / "persist.py"
    source = "from anomalox.backbone import _load_file\nfrom anomalox import _core\nimport anomalox._convert\n"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source)
    found = private_imports(fake)
    assert len(found) == 3
    assert "from anomalox.backbone import _load_file" in found[0]
    assert "from anomalox import _core" in found[1]  # persist does not wrap the extension
    assert "import anomalox._convert" in found[2]


def _public_callables():
    """(qualified name, function) for the public functions and methods of the typed modules."""
    import inspect

    import anomalox
    from anomalox import backbone, detectors, evaluate, metrics, ops, params, persist, report, weights

    seen: set[int] = set()
    for module in (anomalox, ops, metrics, backbone, weights, persist, params, report, evaluate, detectors):
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if id(obj) in seen or not (getattr(obj, "__module__", "") or "").startswith("anomalox"):
                continue
            seen.add(id(obj))
            if inspect.isfunction(obj):
                yield f"{obj.__module__}.{name}", obj
            elif inspect.isclass(obj):
                for attr, value in vars(obj).items():
                    if attr.startswith("_") and attr != "__init__":
                        continue
                    func = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                    if inspect.isfunction(func):
                        yield f"{obj.__module__}.{obj.__name__}.{attr}", func


def test_every_public_function_and_method_has_a_return_annotation():
    import inspect

    checked = dict(_public_callables())
    assert {"anomalox.ops.knn", "anomalox.metrics.aupro", "anomalox.backbone.Backbone.features"} <= set(checked)
    assert any(name.startswith("anomalox.detectors.patchcore.PatchCore.") for name in checked)
    missing = [n for n, f in checked.items() if inspect.signature(f).return_annotation is inspect.Signature.empty]
    assert missing == []
