"""The machine's GPUs and disks, read with `nvidia-smi` and `df` over any Remote.

Parsing is pure (`parse_gpu_csv`, `parse_compute_apps`, `parse_status`), so it is tested with
captured output; the functions that run commands (`machine_status`, `free_gpu_memory`,
`stream_gpu_samples`) each use one command, or for the monitor one long-lived channel.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable

from pydantic import BaseModel, Field

from hctl.remote.base import Remote

GPU_FIELDS = (
    "index",
    "name",
    "utilization.gpu",
    "memory.used",
    "memory.total",
    "temperature.gpu",
    "power.draw",
    "power.limit",
)
APP_FIELDS = ("pid", "process_name", "used_memory")
PROTECTED_PIDS = {0, 1}  # the container's init: killing it ends the pod


class GpuSample(BaseModel):
    """One GPU at one moment. None where nvidia-smi says [N/A]."""

    index: int
    name: str
    utilization_percent: float | None = None
    memory_used_mib: float | None = None
    memory_total_mib: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None


class GpuProcess(BaseModel):
    pid: int
    name: str
    used_memory_mib: float | None = None


class DiskUsage(BaseModel):
    mount: str
    size_gb: float
    free_gb: float


class MachineStatus(BaseModel):
    gpus: list[GpuSample] = Field(default_factory=list)
    processes: list[GpuProcess] = Field(default_factory=list)
    disks: list[DiskUsage] = Field(default_factory=list)
    model_cache: str | None = None
    model_cache_gb: float | None = None
    gpu_error: str | None = None  # e.g. "nvidia-smi: command not found"


def gpu_query_command(loop_seconds: int | None = None) -> str:
    loop = f" -l {loop_seconds}" if loop_seconds else ""
    return f"nvidia-smi --query-gpu={','.join(GPU_FIELDS)} --format=csv,noheader,nounits{loop}"


def apps_query_command() -> str:
    return f"nvidia-smi --query-compute-apps={','.join(APP_FIELDS)} --format=csv,noheader,nounits"


def _number(text: str) -> float | None:
    cleaned = text.strip().split(" ")[0]
    try:
        return float(cleaned)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def parse_gpu_line(line: str) -> GpuSample | None:
    """One CSV line of `gpu_query_command()` output; None when it is not one."""
    parts = [part.strip() for part in line.split(",")]
    if len(parts) != len(GPU_FIELDS) or not parts[0].isdigit():
        return None
    return GpuSample(
        index=int(parts[0]),
        name=parts[1],
        utilization_percent=_number(parts[2]),
        memory_used_mib=_number(parts[3]),
        memory_total_mib=_number(parts[4]),
        temperature_c=_number(parts[5]),
        power_w=_number(parts[6]),
        power_limit_w=_number(parts[7]),
    )


def parse_gpu_csv(text: str) -> list[GpuSample]:
    return [sample for line in text.splitlines() if (sample := parse_gpu_line(line))]


def parse_compute_apps(text: str) -> list[GpuProcess]:
    processes = []
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) >= 3 and parts[0].isdigit():
            name = ",".join(parts[1:-1])
            processes.append(
                GpuProcess(pid=int(parts[0]), name=name, used_memory_mib=_number(parts[-1]))
            )
    return processes


def status_command(volume_path: str) -> str:
    """One command printing every section `parse_status` reads."""
    volume = shlex.quote(volume_path)
    cache = shlex.quote(f"{volume_path.rstrip('/')}/.cache/huggingface")
    return (
        f"echo @@gpu; {gpu_query_command()} 2>&1; "
        f"echo @@apps; {apps_query_command()} 2>/dev/null; "
        f"echo @@disk; df -Pk / {volume} 2>/dev/null; "
        f"if [ -d {volume} ]; then C={cache}; "
        'else C="${HF_HOME:-$HOME/.cache/huggingface}"; fi; '
        'echo "@@cache $C"; [ -d "$C" ] && du -sk "$C" 2>/dev/null; true'
    )


def parse_status(text: str) -> MachineStatus:
    sections: dict[str, list[str]] = {}
    current = ""
    cache_path = None
    for line in text.splitlines():
        if line.startswith("@@"):
            current, _, rest = line[2:].partition(" ")
            sections.setdefault(current, [])
            if current == "cache":
                cache_path = rest.strip() or None
            continue
        sections.setdefault(current, []).append(line)
    gpu_text = "\n".join(sections.get("gpu", []))
    gpus = parse_gpu_csv(gpu_text)
    gpu_error = None
    if not gpus and gpu_text.strip():
        gpu_error = gpu_text.strip().splitlines()[-1]
    disks = []
    seen = set()
    for line in sections.get("disk", [])[1:]:
        parts = line.split()
        if len(parts) >= 6 and parts[1].isdigit() and parts[5] not in seen:
            seen.add(parts[5])
            disks.append(
                DiskUsage(mount=parts[5], size_gb=int(parts[1]) / 1e6, free_gb=int(parts[3]) / 1e6)
            )
    cache_gb = None
    for line in sections.get("cache", []):
        parts = line.split()
        if parts and parts[0].isdigit():
            cache_gb = int(parts[0]) * 1024 / 1e9
    return MachineStatus(
        gpus=gpus,
        processes=parse_compute_apps("\n".join(sections.get("apps", []))),
        disks=disks,
        model_cache=cache_path,
        model_cache_gb=cache_gb,
        gpu_error=gpu_error,
    )


def machine_status(remote: Remote, volume_path: str) -> MachineStatus:
    result = remote.run(status_command(volume_path), timeout=60)
    return parse_status(result.output)


def gpu_processes(remote: Remote) -> list[GpuProcess]:
    result = remote.run(apps_query_command(), timeout=60)
    return parse_compute_apps(result.output)


def kill_command(pids: list[int], grace_s: int = 5) -> str:
    """Stop exactly these processes: TERM, a grace period, then KILL; never init or this shell."""
    listed = " ".join(str(pid) for pid in pids if pid not in PROTECTED_PIDS)
    return (
        f"for p in {listed}; do "
        '[ "$p" = "$$" ] || [ "$p" = "$PPID" ] && continue; '
        'kill -TERM "$p" 2>/dev/null && echo "stopped $p"; done; '
        f"for i in $(seq {grace_s * 10}); do alive=; "
        f'for p in {listed}; do kill -0 "$p" 2>/dev/null && alive=1; done; '
        '[ -z "$alive" ] && break; sleep 0.1; done; '
        f'for p in {listed}; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" && echo "killed $p"; '
        "done; true"
    )


def free_gpu_memory(remote: Remote, processes: list[GpuProcess]) -> list[int]:
    """Stop the listed processes; returns the pids that are gone afterwards."""
    pids = [process.pid for process in processes if process.pid not in PROTECTED_PIDS]
    if not pids:
        return []
    remote.run(kill_command(pids), timeout=60)
    remaining = {process.pid for process in gpu_processes(remote)}
    return [pid for pid in pids if pid not in remaining]


class StopStreaming(Exception):
    """Raised by a sample callback to end the stream (the remote interrupts nvidia-smi)."""


def stream_gpu_samples(
    remote: Remote,
    on_sample: Callable[[list[GpuSample]], None],
    *,
    count: int | None = None,
    interval_s: int = 1,
) -> int:
    """Run `nvidia-smi -l` on one channel and call `on_sample` with each round of GPUs.

    The channel first prints how many GPUs there are, so each round is shown as soon as its last
    line arrives. Stops after `count` rounds (or when `on_sample` raises StopStreaming, or on
    Ctrl-C, which propagates). Returns the number of rounds seen.
    """
    pending = ""
    current: list[GpuSample] = []
    gpu_count: int | None = None
    seen = 0

    def flush() -> None:
        nonlocal current, seen
        if current:
            seen += 1
            on_sample(current)
            current = []
            if count is not None and seen >= count:
                raise StopStreaming

    def take(text: str) -> None:
        nonlocal pending, gpu_count
        pending += text
        *lines, pending = pending.split("\n")
        for line in lines:
            if gpu_count is None and line.strip().isdigit():
                gpu_count = int(line.strip())
                continue
            sample = parse_gpu_line(line)
            if sample is None:
                continue
            if current and sample.index <= current[-1].index:
                flush()  # a new round began before the count was reached
            current.append(sample)
            if gpu_count is not None and len(current) >= gpu_count:
                flush()

    command = (
        "nvidia-smi --query-gpu=count --format=csv,noheader 2>/dev/null | head -n 1; "
        f"{gpu_query_command(interval_s)} 2>&1"
    )
    try:
        result = remote.run(command, on_output=take)
    except StopStreaming:
        return seen
    if result.exit_code != 0 and seen == 0:
        from hctl.errors import RemoteError

        raise RemoteError(
            f"nvidia-smi failed on {remote.description}: {result.output.strip()[-200:]}",
            "Is this a GPU machine? `hctl exec TARGET -- nvidia-smi` shows the full message.",
        )
    return seen
