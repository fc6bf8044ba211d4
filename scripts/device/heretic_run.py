"""Start heretic for the GPU benchmark, with import-only stand-ins for lm_eval and bitsandbytes.

    python3 scripts/device/heretic_run.py --model FOLDER      # heretic's own command line
    python3 scripts/device/heretic_run.py --import-check      # import heretic, print versions

heretic 1.4.0 imports lm_eval and bitsandbytes at module top but needs neither for a plain bf16
search without quantization, and neither is on the GPU machine (bitsandbytes alone is larger
than what may travel there). Where one is missing, its stand-in (heretic_stubs/, beside this
file) is importable while `heretic.main` is imported, and only then: afterwards the folder leaves
the import path and the stand-ins leave sys.modules, so that peft and transformers, which probe
for bitsandbytes at run time, find it absent, as it is. heretic keeps its own references to the
stand-ins, which raise if it ever uses them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

STUBS = Path(__file__).resolve().parent / "heretic_stubs"
STAND_INS = ("bitsandbytes", "lm_eval")


def import_heretic():
    """heretic.main, imported with stand-ins for whichever of STAND_INS is not installed."""
    missing = [name for name in STAND_INS if importlib.util.find_spec(name) is None]
    if missing:
        sys.path.insert(0, str(STUBS))
    try:
        import heretic.main  # heretic-llm: its own environment, never one of hctl's dependencies
    except ImportError as error:
        raise SystemExit(
            f"error: heretic does not import: {error}\n"
            "hint: put heretic-llm and what it imports on PYTHONPATH (scripts/device/README.md)"
        ) from error
    finally:
        if missing:
            sys.path.remove(str(STUBS))
            for name in list(sys.modules):
                if name.split(".")[0] in missing:
                    del sys.modules[name]
            _forget_probes()
    still = [name for name in missing if importlib.util.find_spec(name) is not None]
    if still:
        raise SystemExit(
            f"error: the stand-ins {still} are still importable after heretic's import"
        )
    return heretic.main, missing


def _forget_probes() -> None:
    """Drop peft's cached answers to 'is bitsandbytes here?' given while the stand-in was."""
    import_utils = sys.modules.get("peft.import_utils")
    for name in dir(import_utils) if import_utils else []:
        probe = getattr(import_utils, name)
        if name.startswith("is_bnb") and hasattr(probe, "cache_clear"):
            probe.cache_clear()


def main() -> int:
    module, stood_in = import_heretic()
    if sys.argv[1:] == ["--import-check"]:
        from importlib.metadata import version

        import optuna

        print(
            f"heretic {version('heretic-llm')} imports (optuna {optuna.__version__}; "
            f"stand-ins for {', '.join(stood_in) or 'nothing'})"
        )
        return 0
    return module.main() or 0


if __name__ == "__main__":
    sys.exit(main())
