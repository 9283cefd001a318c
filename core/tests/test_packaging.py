"""core/pyproject.toml declares exactly what core imports: every third-party package a
module of ``nexa`` imports is a dependency (the test kit, ``nexa.testing``, may also use
the ``test`` extra; a feature's own extra, such as ``audio``, may be imported only inside
functions, so core imports without it), and every dependency is imported somewhere."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

CORE = Path(__file__).resolve().parents[1]
SOURCE = CORE / "src" / "nexa"


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalise(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))


def _top_level_imports(tree: ast.Module) -> set[ast.AST]:
    """Import nodes that run when the module is imported (not inside a function)."""
    found: set[ast.AST] = set()
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.add(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def imported_distributions(eager: set[str] | None = None) -> dict[str, set[str]]:
    """Distribution name -> the core modules (relative paths) that import it. ``eager``
    collects the distributions imported when some module is imported."""
    providers = importlib.metadata.packages_distributions()
    out: dict[str, set[str]] = {}
    for path in SOURCE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = _top_level_imports(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "nexa" or top in sys.stdlib_module_names:
                    continue
                dists = providers.get(top)
                assert dists, f"{path.relative_to(SOURCE)} imports {top}, which no installed distribution provides"
                for dist in dists:
                    out.setdefault(normalise(dist), set()).add(path.relative_to(SOURCE).as_posix())
                    if eager is not None and node in top_level:
                        eager.add(normalise(dist))
    return out


USED_THROUGH_UVICORN = {"uvloop", "httptools"}
"""Declared by core but imported only by uvicorn, which picks them up when installed (its
``[standard]`` extra): the C event loop and HTTP parser ``nexa serve`` runs on."""


def test_core_declares_every_package_it_imports_and_nothing_else():
    project = tomllib.loads((CORE / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = {requirement_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    test_extra = {requirement_name(r) for r in extras["test"]}
    feature_extras = {requirement_name(r) for name, reqs in extras.items() if name != "test" for r in reqs}
    eager: set[str] = set()
    imported = imported_distributions(eager)
    for dist, modules in sorted(imported.items()):
        if dist in runtime:
            continue
        if dist in feature_extras:
            assert dist not in eager, f"{dist} is an optional extra: import it inside functions ({sorted(modules)})"
            continue
        only_the_kit = all(m.startswith("testing/") for m in modules)
        assert only_the_kit and dist in test_extra, (
            f"core imports {dist} ({sorted(modules)}) but core/pyproject.toml does not declare it")
    unused = runtime - set(imported) - USED_THROUGH_UVICORN
    assert not unused, f"core/pyproject.toml declares {sorted(unused)}, which core never imports"
