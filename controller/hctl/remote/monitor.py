"""`hctl monitor` and `hctl status` views: rich tables built from GpuSample / MachineStatus.

`gpu_table` and `status_sections` are pure (data in, tables out); `run_monitor` streams
samples from one long-lived `nvidia-smi -l` channel into a `rich.live.Live` view, for `count`
samples or until Ctrl-C, and shows the pod's cost so far when the target is a pod.
`monitor_through_api` is for a pod SSH cannot reach yet: it shows the GPU use the provider
reports (no SSH needed), read again every interval; piped, as plain tab-separated lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from hctl.errors import HctlError
from hctl.output import (
    Cell,
    Column,
    OutputClosed,
    error_console,
    plain_lines,
    print_line,
    write_lines,
)
from hctl.providers.base import Pod
from hctl.remote.base import Remote
from hctl.remote.gpu import GpuSample, MachineStatus, stream_gpu_samples
from hctl.settings import Settings


def _value(number: float | None, unit: str, digits: int = 0) -> str:
    return "n/a" if number is None else f"{number:.{digits}f}{unit}"


GPU_COLUMNS = [
    Column("GPU", justify="right"),
    Column("name"),
    Column("util", justify="right"),
    Column("memory", justify="right"),
    Column("temp", justify="right"),
    Column("power", justify="right"),
]


def gpu_rows(samples: list[GpuSample]) -> list[list[Cell]]:
    """One row per GPU (`GPU_COLUMNS`)."""
    rows: list[list[Cell]] = []
    for sample in samples:
        memory = f"{_value(sample.memory_used_mib, '')} / {_value(sample.memory_total_mib, ' MiB')}"
        power = f"{_value(sample.power_w, '')} / {_value(sample.power_limit_w, ' W')}"
        rows.append(
            [str(sample.index), sample.name, _value(sample.utilization_percent, " %"), memory,
             _value(sample.temperature_c, " °C"), power]
        )  # fmt: skip
    return rows


def gpu_table(samples: list[GpuSample]) -> Table:
    table = Table(title="GPUs", title_justify="left")
    for column in GPU_COLUMNS:
        table.add_column(column.name, justify=column.justify)
    for row in gpu_rows(samples):
        table.add_row(*row)
    return table


def pod_cost_so_far(pod: Pod, extra_seconds: float = 0.0) -> float | None:
    """cost_per_hr × uptime: what the pod has cost since it last started."""
    if pod.uptime_seconds is None:
        return None
    return pod.cost_per_hr * (pod.uptime_seconds + extra_seconds) / 3600


def cost_line(pod: Pod | None, extra_seconds: float = 0.0) -> Text:
    if pod is None:
        return Text("")
    spent = pod_cost_so_far(pod, extra_seconds)
    spent_text = "unknown" if spent is None else f"${spent:.2f}"
    return Text(f"pod {pod.id}: ${pod.cost_per_hr:.2f}/h, {spent_text} since it started")


@dataclass(frozen=True)
class StatusSection:
    """One part of `hctl status`: a table, or the line said when it has no rows."""

    title: str
    columns: list[Column]
    rows: list[list[Cell]]
    empty: str


def status_sections(status: MachineStatus) -> list[StatusSection]:
    """The GPUs, the processes holding GPU memory, and the disks."""
    processes = [
        [str(process.pid), process.name, _value(process.used_memory_mib, " MiB")]
        for process in status.processes
    ]
    disks = [
        [disk.mount, f"{disk.free_gb:.1f} GB", f"{disk.size_gb:.1f} GB"] for disk in status.disks
    ]
    right = "right"
    return [
        StatusSection(
            "GPUs",
            GPU_COLUMNS,
            gpu_rows(status.gpus),
            f"No GPU found ({status.gpu_error or 'nvidia-smi printed nothing'}).",
        ),
        StatusSection(
            "Processes using the GPU",
            [Column("pid", justify=right), Column("process"), Column("memory", justify=right)],
            processes,
            "No process holds GPU memory.",
        ),
        StatusSection(
            "Disks",
            [
                Column("mount", whole=True),
                Column("free", justify=right),
                Column("size", justify=right),
            ],
            disks,
            "No disk found.",
        ),
    ]


def model_cache_line(status: MachineStatus) -> str | None:
    if not status.model_cache:
        return None
    size = "empty" if status.model_cache_gb is None else f"{status.model_cache_gb:.2f} GB"
    return f"Model cache {status.model_cache}: {size}"


def run_monitor(
    remote: Remote,
    console: Console,
    *,
    pod: Pod | None = None,
    count: int | None = None,
    interval_s: int = 1,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Show live GPU samples until `count` samples or Ctrl-C; returns how many were shown.

    Piped, every sample adds one tab-separated line per GPU under one header line (the cost goes
    to stderr), as `monitor_through_api` does: `hctl monitor > gpus.tsv` logs the GPUs.
    """
    started = clock()
    if not console.is_terminal:
        written = 0  # the header goes with the first sample: an unreachable machine writes none

        def write(samples: list[GpuSample]) -> None:
            nonlocal written
            lines = plain_lines(GPU_COLUMNS, gpu_rows(samples))
            try:
                write_lines(console, lines[1:] if written else lines)
            except BrokenPipeError:  # `| head`: the remote's nvidia-smi is stopped
                raise OutputClosed from None
            written += 1
            if pod is not None:
                print_line(cost_line(pod, clock() - started).plain, output=error_console)

        try:
            return stream_gpu_samples(remote, write, count=count, interval_s=interval_s)
        except KeyboardInterrupt:
            return -1
    waiting = Text(f"waiting for nvidia-smi on {remote.description}...")
    with Live(waiting, console=console, auto_refresh=False, transient=False) as live:

        def show(samples: list[GpuSample]) -> None:
            live.transient = False  # a reading stays on the screen (and is all a pipe gets)
            live.update(Group(gpu_table(samples), cost_line(pod, clock() - started)), refresh=True)

        live.transient = True  # until a reading arrives: a failure leaves no "waiting" behind
        try:
            return stream_gpu_samples(remote, show, count=count, interval_s=interval_s)
        except KeyboardInterrupt:
            return -1


API_GPU_COLUMNS = [
    Column("pod", whole=True),
    Column("status"),
    Column("GPU", justify="right"),
    Column("util", justify="right"),
    Column("memory", justify="right"),
]


def api_gpu_rows(pod: Pod) -> list[list[Cell]]:
    """The GPU use the provider reports for a pod, one row per GPU (`API_GPU_COLUMNS`)."""
    return [
        [pod.id, str(pod.status), str(index), _value(gpu.utilisation_percent, " %"),
         _value(gpu.memory_percent, " %")]
        for index, gpu in enumerate(pod.gpus)
    ]  # fmt: skip


def _no_figures(pod: Pod) -> str:
    return f"pod {pod.id} is {pod.status}: no GPU figures reported yet."


def api_gpu_table(pod: Pod) -> RenderableType:
    """The GPU use the provider reports for a pod (utilisation and memory, in percent)."""
    if not pod.gpus:
        return Text(_no_figures(pod))
    table = Table()
    for column in API_GPU_COLUMNS[2:]:
        table.add_column(column.name, justify=column.justify)
    for row in api_gpu_rows(pod):
        table.add_row(*row[2:])
    return Group(Text(f"GPUs of pod {pod.id}, as the provider reports them:"), table)


def monitor_through_api(
    target: str | None,
    settings: Settings,
    console: Console,
    *,
    count: int | None = None,
    interval_s: float = 1,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Show a pod's GPU use from the provider's API, for `count` readings or until Ctrl-C.

    On a terminal the view is redrawn in place; piped, every reading adds one tab-separated line
    per GPU under one header line (the cost goes to stderr). False when `target` is not a pod
    (an SSH address or this machine: nothing to ask).
    """
    from hctl.providers import make_provider
    from hctl.targets import resolve_pod_target

    provider = make_provider(settings)
    pod = resolve_pod_target(target, settings, provider)
    if pod is None:
        return False
    show = _live_view(console, pod) if console.is_terminal else _piped_view(console, pod)
    shown = 0
    with show as update:
        try:
            while count is None or shown < count:
                if shown:
                    sleep(interval_s)
                try:
                    pod = provider.get(pod.id)
                except HctlError as error:
                    update(None, f"cannot read pod {pod.id}: {error.message}")
                    continue
                update(pod, None)
                shown += 1
        except KeyboardInterrupt:
            pass
    return True


# A view of the API readings: called with a fresh pod, or with None and what went wrong.
ReadingView = Callable[[Pod | None, str | None], None]


@contextmanager
def _live_view(console: Console, pod: Pod) -> Iterator[ReadingView]:
    with Live(api_gpu_table(pod), console=console, auto_refresh=False) as live:

        def update(fresh: Pod | None, problem: str | None) -> None:
            if fresh is None:
                live.update(Text(problem or ""), refresh=True)
            else:
                live.update(Group(api_gpu_table(fresh), cost_line(fresh)), refresh=True)

        yield update


@contextmanager
def _piped_view(console: Console, pod: Pod) -> Iterator[ReadingView]:
    print_line(f"GPUs of pod {pod.id}, as the provider reports them:", output=error_console)
    write_lines(console, plain_lines(API_GPU_COLUMNS, []))

    def update(fresh: Pod | None, problem: str | None) -> None:
        if fresh is None:
            print_line(problem or "", output=error_console)
            return
        if not fresh.gpus:
            print_line(_no_figures(fresh), output=error_console)
        write_lines(console, plain_lines(API_GPU_COLUMNS, api_gpu_rows(fresh))[1:])
        print_line(cost_line(fresh).plain, output=error_console)

    yield update
