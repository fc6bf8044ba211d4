"""Import-only stand-in for bitsandbytes: benchmark only, never used in a run.

heretic 1.4.0 imports bitsandbytes at module top but uses it only for 4-bit quantization, which
the GPU benchmark (scripts/device/bench_h200.sh, plain bf16) never asks for. Only
scripts/device/heretic_run.py puts this folder on heretic's import path, and only while heretic is
imported; it is never installed and never seen by hctl. Reading any attribute raises.
"""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError(
        f"bitsandbytes.{name}: this is the benchmark's import-only stand-in "
        "(scripts/device/heretic_stubs); quantization is not part of the benchmark"
    )
