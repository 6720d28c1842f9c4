"""The typing contract of the compiled modules: `_core.pyi` declares exactly what `anomalox._core`
holds, and `_tch.pyi` what `anomalox_tch._tch` holds (when the tch part is installed), with the
same parameters (names, kinds, defaults) as the signatures pyo3 compiled in."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import anomalox
from anomalox import _core
from anomalox.backbone import tch_available


def _modules() -> list[object]:
    modules: list[object] = [pytest.param((_core, Path(anomalox.__file__).with_name("_core.pyi")), id="_core")]
    if tch_available():
        import anomalox_tch

        stub = Path(anomalox_tch.__file__).with_name("_tch.pyi")
        modules.append(pytest.param((anomalox_tch._tch, stub), id="_tch"))
    return modules


MODULES = _modules()

# Module attributes every extension module has; not part of the API.
MODULE_DUNDERS = {"__all__", "__doc__", "__file__", "__loader__", "__name__", "__package__", "__spec__"}


def _stub(stub: Path) -> ast.Module:
    return ast.parse(stub.read_text())


def _stub_names(tree: ast.Module) -> dict[str, ast.AST]:
    names: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return names


def _stub_parameters(fn: ast.FunctionDef, method: bool) -> list[tuple[str, str, object]]:
    """(name, kind, default) of each parameter, `self` dropped for a method."""
    args = fn.args
    positional = [(a, "positional_only") for a in args.posonlyargs] + [(a, "positional_or_keyword") for a in args.args]
    defaults: list[object] = [inspect.Parameter.empty] * (len(positional) - len(args.defaults))
    defaults += [ast.literal_eval(d) for d in args.defaults]
    params = [(a.arg, kind, d) for (a, kind), d in zip(positional, defaults)]
    if args.vararg:
        params.append((args.vararg.arg, "var_positional", inspect.Parameter.empty))
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        params.append((a.arg, "keyword_only", inspect.Parameter.empty if d is None else ast.literal_eval(d)))
    if args.kwarg:
        params.append((args.kwarg.arg, "var_keyword", inspect.Parameter.empty))
    if method and params and params[0][0] == "self":
        params = params[1:]
    return [(n, "positional_or_keyword" if k == "positional_only" else k, d) for n, k, d in params]


def _compiled_parameters(obj: object, method: bool) -> list[tuple[str, str, object]]:
    """The same for a compiled function; pyo3 marks `self` positional-only, which the stub need not."""
    params = list(inspect.signature(obj).parameters.values())  # type: ignore[arg-type]
    if method and params and params[0].name == "self":
        params = params[1:]
    kinds = {
        inspect.Parameter.POSITIONAL_ONLY: "positional_or_keyword",
        inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional_or_keyword",
        inspect.Parameter.VAR_POSITIONAL: "var_positional",
        inspect.Parameter.KEYWORD_ONLY: "keyword_only",
        inspect.Parameter.VAR_KEYWORD: "var_keyword",
    }
    return [(p.name, kinds[p.kind], p.default) for p in params]


def _decorators(fn: ast.FunctionDef) -> set[str]:
    return {d.id for d in fn.decorator_list if isinstance(d, ast.Name)}


def _compiled_names(module: object) -> list[str]:
    return sorted(n for n in dir(module) if n not in MODULE_DUNDERS)


@pytest.mark.parametrize("compiled", MODULES)
def test_every_compiled_name_is_declared_in_the_stub(compiled):
    module, stub = compiled
    declared = _stub_names(_stub(stub))
    missing = [n for n in _compiled_names(module) if n not in declared]
    assert not missing, f"in {module.__name__} but not in {stub.name}: {missing}"


@pytest.mark.parametrize("compiled", MODULES)
def test_every_stub_declaration_exists_in_the_compiled_module(compiled):
    module, stub = compiled
    tree = _stub(stub)
    declared = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    declared += [n.target.id for n in tree.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    extra = [n for n in declared if not hasattr(module, n)]
    assert not extra, f"declared in {stub.name} but not in {module.__name__}: {extra}"


def _members(kind: object) -> list[object]:
    """(module, stub, name) for every compiled function (kind "function") or class of every module."""
    out = []
    for param in MODULES:
        module, stub = param.values[0]
        for n in _compiled_names(module):
            value = getattr(module, n)
            if inspect.isbuiltin(value) if kind == "function" else inspect.isclass(value):
                out.append(pytest.param(module, stub, n, id=f"{module.__name__}.{n}"))
    return out


@pytest.mark.parametrize("module, stub, name", _members("function"))
def test_function_signature_matches_the_stub(module, stub, name):
    node = _stub_names(_stub(stub))[name]
    assert isinstance(node, ast.FunctionDef), f"{name} is a function in {module.__name__} but not in the stub"
    assert _stub_parameters(node, method=False) == _compiled_parameters(getattr(module, name), method=False)


def _has_constructor(cls: type) -> bool:
    """False for a pyo3 class without ``#[new]`` (its ``__new__`` raises "No constructor defined")."""
    try:
        cls.__new__(cls)
    except TypeError as e:
        return "No constructor defined" not in str(e)
    except Exception:
        return True
    return True


@pytest.mark.parametrize("module, stub, name", _members("class"))
def test_class_members_match_the_stub(module, stub, name):
    cls = getattr(module, name)
    node = _stub_names(_stub(stub))[name]
    assert isinstance(node, ast.ClassDef), f"{name} is a class in {module.__name__} but not in the stub"
    stub_members = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}

    init = stub_members.pop("__init__", None)
    if "__new__" in vars(cls) and _has_constructor(cls):
        assert init is not None, f"{name}: the constructor is not declared"
        assert _stub_parameters(init, method=True) == _compiled_parameters(cls, method=False), f"{name}.__init__"
    else:  # pyo3 gives a class without #[new] a __new__ that refuses: built by static methods
        assert init is None, f"{name}: the stub declares a constructor the class does not have"

    for member, value in vars(cls).items():
        if member.startswith("__") and member.endswith("__"):
            continue
        assert member in stub_members, f"{name}.{member} is not declared in the stub"
        fn = stub_members.pop(member)
        if isinstance(value, staticmethod):
            assert "staticmethod" in _decorators(fn), f"{name}.{member} is a staticmethod"
            assert _stub_parameters(fn, method=False) == _compiled_parameters(getattr(cls, member), method=False)
        elif inspect.isgetsetdescriptor(value):
            assert "property" in _decorators(fn), f"{name}.{member} is a property"
        else:
            assert _stub_parameters(fn, method=True) == _compiled_parameters(value, method=True), f"{name}.{member}"
    assert not stub_members, f"declared in the stub but not on {module.__name__}.{name}: {sorted(stub_members)}"


@pytest.mark.parametrize("compiled", MODULES)
def test_stub_annotates_every_return(compiled):
    _, stub = compiled
    for node in ast.walk(_stub(stub)):
        if isinstance(node, ast.FunctionDef):
            assert node.returns is not None, f"{node.name} has no return annotation in {stub.name}"
