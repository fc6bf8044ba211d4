"""Float32 linear layers on a CPU through oneDNN, where that measures faster than torch's default.

torch computes a float32 `Linear` on a CPU with MKL's sgemm, and MKL takes its AVX2 path on AMD
CPUs. On an AMD EPYC Zen 5 machine, one thread, a [64 x 576] by [576 x 1536] product ran at 107
GFLOPS through MKL and 224 through oneDNN (the kernel behind `torch.ops.mkldnn._linear_pointwise`,
which torch.compile uses on CPUs); at 608 rows, 112 against 246; at one row, 38 against 35. On a
Zen 4 machine (AVX-512 on 256-bit units) the same product ran at about the same speed both ways,
and only the output head's wide product gained (1.4x at 64 rows, 1.15x at 512). Both compute in
float32 and differ only in the order of their sums, so they agree to float rounding, as two
thread counts do.

`install(model)` measures the two on one layer of each weight shape (at a decode step's rows and
a prompt pass's, in turn) and makes the float32 `Linear` layers of the shapes where oneDNN agrees
and pays (`pays`) compute through it from then on: the modules keep their weights (an edit made
in place is seen at the next call) and their hooks. Inputs of fewer than MIN_ROWS rows, and
inputs that need gradients, still go through torch's own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch.nn import functional

# oneDNN is taken for a shape only if it is on average at least this many times as fast.
FASTER = 1.15
# Fewer rows than this go through torch's default (oneDNN measured slower at one row).
MIN_ROWS = 4
# The rows the measurement times: a decode step's and a prompt pass's.
MEASURED_ROWS = (64, 512)

Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _onednn_kernel() -> Callable | None:
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return None


_KERNEL = _onednn_kernel()


def onednn_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`functional.linear` through oneDNN where it applies (see MIN_ROWS), else torch's own."""
    if (
        _KERNEL is None
        or input.shape[:-1].numel() < MIN_ROWS
        or input.dtype != torch.float32
        or weight.dtype != torch.float32
        or not weight.is_contiguous()
        or weight.device.type != "cpu"
        or (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))
    ):
        return functional.linear(input, weight, bias)
    return _KERNEL(input, weight, bias, "none", [], "")


def linear_of(module: torch.nn.Module) -> Linear:
    """How `module` (a `Linear`) computes its product: oneDNN once installed, else torch's."""
    return onednn_linear if getattr(module, "_onednn_linear", False) else functional.linear


def install(model: torch.nn.Module) -> str | None:
    """Route each shape of `model`'s float32 CPU linear layers through oneDNN where it measures
    faster for that shape (`pays`); a line for the log saying what was measured (None where
    nothing could be: no such layer, no oneDNN)."""
    layers = cpu_float32_linears(model)
    if not layers or _onednn_kernel() is None:
        return None
    shapes: dict[tuple[int, ...], list[torch.nn.Linear]] = {}
    for module in layers:
        shapes.setdefault(tuple(module.weight.shape), []).append(module)
    measured: list[tuple[tuple[int, ...], list[float]]] = []
    try:
        for shape, group in sorted(shapes.items(), key=lambda item: -math.prod(item[0])):
            speedups = [_speedup(group[0].weight.detach(), rows) for rows in MEASURED_ROWS]
            if any(speedup is None for speedup in speedups):
                return "CPU linear layers: torch's default (oneDNN's products disagree)"
            measured.append((shape, speedups))
    except RuntimeError as error:  # a kernel this build or CPU does not run
        return f"CPU linear layers: torch's default (oneDNN failed: {error})"
    taken = [shape for shape, speedups in measured if pays(speedups)]
    for shape in taken:
        route(shapes[shape])
    rows = " and ".join(str(count) for count in MEASURED_ROWS)

    def listed(which: list[tuple[tuple[int, ...], list[float]]]) -> str:
        return "; ".join(
            "x".join(map(str, shape)) + ": " + ", ".join(f"{value:.2f}x" for value in speedups)
            for shape, speedups in which
        )

    routed = [item for item in measured if item[0] in taken]
    kept = [item for item in measured if item[0] not in taken]
    if not routed:
        return f"CPU linear layers: torch's default (oneDNN at {rows} rows: {listed(kept)})"
    count = sum(len(shapes[shape]) for shape in taken)
    line = f"CPU linear layers: oneDNN for {count} of {len(layers)} ({listed(routed)}"
    if kept:
        line += f"; torch's default for the rest: {listed(kept)}"
    return line + f"; speed against torch's default at {rows} rows)"


def pays(speedups: list[float]) -> bool:
    """oneDNN is worth taking for a shape: on average (geometric) at least FASTER times as fast
    as torch's default over the measured rows, and slower at none of them."""
    mean = math.prod(speedups) ** (1 / len(speedups))
    return mean >= FASTER and min(speedups) >= 1.0


def cpu_float32_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """`model`'s float32 `Linear` layers on the CPU (those oneDNN may compute)."""
    return [
        module
        for module in model.modules()
        if isinstance(module, torch.nn.Linear)
        and module.weight.dtype == torch.float32
        and module.weight.device.type == "cpu"
        and module.weight.is_contiguous()
    ]


def route(layers: list[torch.nn.Linear]) -> None:
    """Make each of `layers` compute through `onednn_linear` (unmeasured: `install` measures)."""
    for module in layers:
        module.forward = _forward_for(module)
        module._onednn_linear = True


def _forward_for(module: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(input: torch.Tensor) -> torch.Tensor:
        return onednn_linear(input, module.weight, module.bias)

    return forward


def _speedup(weight: torch.Tensor, rows: int) -> float | None:
    """How many times as fast oneDNN is as torch's default for `rows` rows of `weight`'s product
    (None: they disagree beyond float rounding)."""
    generator = torch.Generator().manual_seed(rows)
    input = torch.randn(rows, weight.shape[1], generator=generator)
    with torch.inference_mode():
        plain = functional.linear(input, weight)
        fast = onednn_linear(input, weight)
        scale = float(plain.abs().max()) or 1.0
        if not torch.allclose(fast, plain, rtol=1e-4, atol=1e-5 * scale):
            return None
        plain_seconds, fast_seconds = paired_best_times(
            lambda: functional.linear(input, weight), lambda: onednn_linear(input, weight)
        )
        return plain_seconds / fast_seconds


def paired_best_times(
    first: Callable[[], object], second: Callable[[], object], repeats: int = 5
) -> tuple[float, float]:
    """The shortest of `repeats` timed calls of each of `first` and `second`, taken in turn (so a
    busy moment on a shared machine slows both), after one untimed call of each."""
    first()
    second()
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for index, run in enumerate((first, second)):
            started = time.perf_counter()
            run()
            best[index] = min(best[index], time.perf_counter() - started)
    return best[0], best[1]


def best_time(run: Callable[[], object], repeats: int = 5) -> float:
    """The shortest of `repeats` timed calls of `run` (after one untimed)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


__all__ = [
    "best_time",
    "cpu_float32_linears",
    "install",
    "linear_of",
    "onednn_linear",
    "paired_best_times",
    "pays",
    "route",
]
