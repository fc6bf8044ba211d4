"""The two halves' boundary: the worker never imports the controller, the contract they share
imports without torch, the worker's modules import each other without cycles, and there is one
version and one error tree."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import hctl
import hctl.errors
import hctl_worker
import hctl_worker.errors
from hctl.cli import app as controller_app
from hctl_worker.cli import app as worker_app
from tests.conftest import REPO_ROOT

WORKER_PACKAGE = Path(hctl_worker.__file__).resolve().parent

# The worker's modules the controller may import: they must work on a laptop without torch.
CONTRACT_MODULES = (
    "hctl_worker",
    "hctl_worker.errors",
    "hctl_worker.events",
    "hctl_worker.trials",
    "hctl_worker.markers",
    "hctl_worker.settings",
    "hctl_worker.prompts",
    "hctl_worker.command_line",
)
HEAVY_PACKAGES = ("torch", "transformers", "accelerate", "optuna", "safetensors", "numpy")


def imported_packages(path: Path) -> set[str]:
    """The top-level package of every import in a module, wherever in the module it is."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_scan_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "sample.py"
    module.write_text("def f():\n    from hctl.errors import HctlError\n    import hctl_worker\n")
    assert imported_packages(module) == {"hctl", "hctl_worker"}


def test_no_worker_module_imports_the_controller() -> None:
    offenders = [
        str(path.relative_to(WORKER_PACKAGE))
        for path in sorted(WORKER_PACKAGE.rglob("*.py"))
        if "hctl" in imported_packages(path)
    ]
    assert len(list(WORKER_PACKAGE.rglob("*.py"))) > 10  # the scan looks where the worker is
    assert offenders == [], f"worker modules importing hctl (the laptop side): {offenders}"


def worker_imports(path: Path) -> set[str]:
    """The worker modules a worker module imports, at run time (wherever in the module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    type_checking_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_checking_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "hctl_worker":
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hctl_worker."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(
                alias.name.split(".")[1]
                for alias in node.names
                if alias.name.startswith("hctl_worker.")
            )
    modules = {module.stem for module in path.parent.glob("*.py")}
    return (names & modules) - {path.stem}


def test_the_worker_modules_import_each_other_without_cycles() -> None:
    graph = {path.stem: worker_imports(path) for path in WORKER_PACKAGE.glob("*.py")}
    assert {"directions", "generation", "architecture"} <= graph["ablation"] | graph["directions"]
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


def test_the_cycle_check_sees_a_cycle(tmp_path: Path) -> None:
    (tmp_path / "first.py").write_text("def f():\n    from hctl_worker.second import g\n")
    (tmp_path / "second.py").write_text("from hctl_worker import first\n")
    graph = {path.stem: worker_imports(path) for path in tmp_path.glob("*.py")}
    assert graph == {"first": {"second"}, "second": {"first"}}
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter(graph).prepare()


BLOCKING_IMPORTER = """
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {heavy}:
            raise ImportError(f"blocked in this test: {{name}}")
        return None

sys.meta_path.insert(0, Refuse())
import importlib
for module in {modules}:
    importlib.import_module(module)
loaded = sorted(name for name in sys.modules if name.split(".")[0] in {heavy})
print("loaded:", loaded)
sys.exit(1 if loaded else 0)
"""


def test_the_contract_modules_import_with_torch_blocked() -> None:
    code = BLOCKING_IMPORTER.format(heavy=set(HEAVY_PACKAGES), modules=list(CONTRACT_MODULES))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_blocker_does_block() -> None:
    code = BLOCKING_IMPORTER.format(heavy={"torch"}, modules=["hctl_worker.model"])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "blocked in this test: torch" in result.stderr


def test_one_error_tree_rooted_in_one_base_class() -> None:
    assert hctl.errors.HctlError is hctl_worker.errors.HctlError
    assert issubclass(hctl_worker.errors.WorkerError, hctl.errors.HctlError)
    assert issubclass(hctl.errors.ConfigError, hctl_worker.errors.HctlError)


def test_hctl_and_hctl_worker_report_one_version() -> None:
    assert hctl.__version__ == hctl_worker.__version__
    runner = CliRunner()
    controller = runner.invoke(controller_app, ["--version"])
    worker = runner.invoke(worker_app, ["--version"])
    assert controller.exit_code == worker.exit_code == 0
    assert controller.stdout.split() == ["hctl", hctl_worker.__version__]
    assert worker.stdout.split() == ["hctl-worker", hctl_worker.__version__]


def test_the_packaged_version_is_the_worker_version() -> None:
    """pyproject's dynamic version resolves, statically, to the one version."""
    from setuptools.config.pyprojecttoml import read_configuration

    pyproject = REPO_ROOT / "pyproject.toml"  # the checkout's (the package may be installed)
    configuration = read_configuration(pyproject)
    assert configuration["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "hctl_worker.__version__"
    }
    assert configuration["project"]["version"] == hctl_worker.__version__
