"""The shape of genkern.train and genkern.eval, read from their source: no import cycle in the
trainer, metrics that never reach into the trainer, short functions with few parameters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from utils import ROOT

PACKAGE = Path(ROOT) / "genkern"
MAX_LINES = 60
MAX_PARAMS = 8
MAX_FILE_LINES = 400


def _modules(package: str) -> dict:
    """{dotted module name: parsed AST} of the .py files directly in genkern/<package>/."""
    out = {}
    for path in sorted((PACKAGE / package).glob("*.py")):
        name = f"genkern.{package}" if path.stem == "__init__" else f"genkern.{package}.{path.stem}"
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def _imports(tree: ast.AST) -> set:
    """Every module an `import` or `from ... import` names, at the top or inside functions. For
    `from pkg import name` both pkg and pkg.name (name may be a submodule) are listed."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _find_cycle(graph: dict):
    """A list of modules forming a cycle in {module: modules it imports}, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_train_has_no_import_cycle():
    modules = _modules("train")
    graph = {}
    for name, tree in modules.items():
        # Importing a submodule also imports its package: `from genkern.train import plots` is an
        # edge to genkern.train.plots, not to genkern/train/__init__.py (which Python ran already).
        targets = {m for m in _imports(tree) if m in modules and m != name}
        if name != "genkern.train":
            targets.discard("genkern.train")
        graph[name] = targets
    assert _find_cycle(graph) is None, f"import cycle in genkern.train: {' -> '.join(_find_cycle(graph))}"


def test_find_cycle_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_eval_never_imports_train():
    for name, tree in _modules("eval").items():
        bad = sorted(m for m in _imports(tree) if m == "genkern.train" or m.startswith("genkern.train."))
        assert not bad, f"{name} imports {bad}: metrics read models and data, not the trainer"


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _params(fn: ast.FunctionDef) -> list:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


@pytest.mark.parametrize("name", sorted(_modules("train")))
def test_train_functions_are_short_with_few_parameters(name):
    tree = _modules("train")[name]
    for fn in _functions(tree):
        lines = fn.end_lineno - fn.lineno + 1
        assert lines <= MAX_LINES, f"{name}.{fn.name} is {lines} lines long (at most {MAX_LINES})"
        params = _params(fn)
        assert len(params) <= MAX_PARAMS, f"{name}.{fn.name} takes {len(params)} parameters {params}"


@pytest.mark.parametrize("package", ["train", "eval"])
def test_files_stay_short(package):
    for path in sorted((PACKAGE / package).glob("*.py")):
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_FILE_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines"
