"""Import-only stand-in for lm_eval: benchmark only, never used in a run.

heretic 1.4.0 imports lm_eval at module top but uses it only when asked to benchmark an exported
model, which the GPU benchmark (scripts/device/bench_h200.sh) never does. Only
scripts/device/heretic_run.py puts this folder on heretic's import path, and only while heretic is
imported; it is never installed and never seen by hctl. Reading any attribute raises.
"""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError(
        f"lm_eval.{name}: this is the benchmark's import-only stand-in "
        "(scripts/device/heretic_stubs); lm-eval is not part of the benchmark"
    )
