"""core/pyproject.toml declares exactly what core imports: every third-party package a
module of ``nexa`` imports is a dependency (the test kit, ``nexa.testing``, may also use
the ``test`` extra), and every dependency is imported somewhere."""

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


def imported_distributions() -> dict[str, set[str]]:
    """Distribution name -> the core modules (relative paths) that import it."""
    providers = importlib.metadata.packages_distributions()
    out: dict[str, set[str]] = {}
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
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
    return out


def test_core_declares_every_package_it_imports_and_nothing_else():
    project = tomllib.loads((CORE / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = {requirement_name(r) for r in project["dependencies"]}
    test_extra = {requirement_name(r) for r in project["optional-dependencies"]["test"]}
    imported = imported_distributions()
    for dist, modules in sorted(imported.items()):
        if dist in runtime:
            continue
        only_the_kit = all(m.startswith("testing/") for m in modules)
        assert only_the_kit and dist in test_extra, (
            f"core imports {dist} ({sorted(modules)}) but core/pyproject.toml does not declare it")
    unused = runtime - set(imported)
    assert not unused, f"core/pyproject.toml declares {sorted(unused)}, which core never imports"
