"""Access for tests to the fixture scripts and to the real models they build.

scripts/ is not a package, so its modules are loaded by path. The real models (SmolLM2-135M-
Instruct as shipped, and safety-tuned into a refuser) are built on first use into a cache
outside git by scripts/make_real_refuser.py; tests get their folders through the session
fixtures in tests/conftest.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "scripts"


def script_module(name: str) -> ModuleType:
    """A module of scripts/ (e.g. "refuser_probe"), imported once by path."""
    if name in sys.modules:
        return sys.modules[name]
    if str(SCRIPTS) not in sys.path:  # the scripts import their sibling modules
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def read_prompts(folder: Path, name: str) -> list[str]:
    """One prompt set of a model folder (prompts/NAME.txt, one prompt per line)."""
    path = folder / "prompts" / f"{name}.txt"
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def built_real_models() -> dict[str, Path]:
    """{"base": folder, "refuser": folder}, built first if needed; BuildError if it cannot be."""
    return script_module("make_real_refuser").ensure_built()
