"""Every import is declared in pyproject.toml, in the part of the install that needs it.

The laptop install (`pip install .`) must bring everything `controller/` imports; the `worker`
extra what `worker/` imports on top; `dev` what the tests and scripts use. A package that merely
arrives through another one (click through typer, once) is not declared, and breaks the day that
other one stops bringing it: so each import is mapped to the distribution that provides it and
that distribution must be named. Imports guarded by `except ImportError` are optional and exempt.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# The scripts import each other by their file names (they run with scripts/ on the path).
FIRST_PARTY = {"hctl", "hctl_worker", "tests", "scripts"} | {
    path.stem for path in (REPO_ROOT / "scripts").glob("*.py")
}
PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return _canonical(re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0])


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(*extras: str) -> set[str]:
    """The distributions the base install and these extras name (`hctl[test]` expanded)."""
    names = {_name(item) for item in PROJECT["dependencies"]}
    for extra in extras:
        for item in PROJECT["optional-dependencies"][extra]:
            own = re.fullmatch(r"hctl\[([\w,\s-]+)\]", item.strip())
            if own:
                names |= _declared(*(part.strip() for part in own.group(1).split(",")))
            else:
                names.add(_name(item))
    return names


def _guarded(tree: ast.AST) -> set[int]:
    """Line numbers of imports inside `try: ... except ImportError` (optional imports)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        catches = {
            getattr(handler.type, "id", None) or getattr(handler.type, "attr", None)
            for handler in node.handlers
        }
        if catches & {"ImportError", "ModuleNotFoundError"}:
            lines |= {inner.lineno for inner in ast.walk(node) if hasattr(inner, "lineno")}
    return lines


def third_party_imports(folder: Path) -> dict[str, str]:
    """Top-level module → the first file importing it, for every non-optional import."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guarded = _guarded(tree)
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in guarded:
                continue
            for top in _third_party(node):
                found.setdefault(top, str(path.relative_to(REPO_ROOT)))
    return found


def _third_party(node: ast.AST) -> set[str]:
    """The top-level modules of other distributions an import statement names (none for any
    other node, and for the standard library, this project and relative imports)."""
    if isinstance(node, ast.Import):
        modules = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        modules = [node.module]
    else:
        return set()
    tops = {module.split(".")[0] for module in modules}
    return {
        top
        for top in tops
        if top not in sys.stdlib_module_names and top not in FIRST_PARTY and top != "__future__"
    }


def undeclared(folder: Path, declared: set[str]) -> list[str]:
    providers = importlib.metadata.packages_distributions()
    problems = []
    for module, where in sorted(third_party_imports(folder).items()):
        distributions = {_canonical(name) for name in providers.get(module, [])}
        if not distributions and _canonical(module) in declared:
            continue  # declared for other Pythons or systems only (`tomli; python_version < ...`)
        if not distributions:
            problems.append(f"{module} (imported in {where}) is not installed here")
        elif not distributions & declared:
            problems.append(f"{module} (imported in {where}) comes from {sorted(distributions)}")
    return problems


def test_the_laptop_side_imports_only_the_base_dependencies() -> None:
    assert undeclared(REPO_ROOT / "controller", _declared()) == []


# The worker's modules the controller imports (they must stay torch-free and light).
SHARED_MODULES = ("events", "settings", "errors", "prompts", "markers", "trials", "command_line")


def test_the_worker_modules_the_controller_imports_need_no_extra() -> None:
    """Their module-level imports are laptop dependencies (a function may import the hub's)."""
    declared = _declared()
    providers = importlib.metadata.packages_distributions()
    for name in SHARED_MODULES:
        tree = ast.parse((REPO_ROOT / "worker" / "hctl_worker" / f"{name}.py").read_text())
        for node in tree.body:
            for top in _third_party(node):
                provided = {_canonical(item) for item in providers.get(top, [])}
                assert provided & declared, f"worker/hctl_worker/{name}.py imports {top}"


@pytest.mark.worker
def test_the_worker_imports_only_the_base_and_worker_dependencies() -> None:
    # `evaluate`: lm_eval, imported only when lm-eval tasks are asked for and it is installed.
    assert undeclared(REPO_ROOT / "worker", _declared("worker", "evaluate")) == []


@pytest.mark.worker
def test_tests_and_scripts_import_only_declared_dependencies() -> None:
    declared = _declared("worker", "dev")
    problems = undeclared(REPO_ROOT / "tests", declared) + undeclared(
        REPO_ROOT / "scripts", declared
    )
    assert problems == []


def test_click_is_not_imported_since_typer_brings_its_own() -> None:
    assert "click" not in third_party_imports(REPO_ROOT / "controller")
    assert importlib.util.find_spec("typer") is not None
