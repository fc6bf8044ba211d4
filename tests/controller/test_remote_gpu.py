"""Parsing nvidia-smi and df output (pure), and the monitor's sample grouping."""

from __future__ import annotations

from hctl.providers.base import Pod, PodStatus
from hctl.remote import gpu
from hctl.remote.base import CommandResult
from hctl.remote.monitor import pod_cost_so_far


def test_gpu_csv_with_missing_values_and_two_gpus() -> None:
    text = (
        "0, NVIDIA H100 80GB HBM3, 100, 79000, 81559, 71, 690.12, 700.00\n"
        "1, NVIDIA H100 80GB HBM3, [N/A], 3, 81559, 34, [Not Supported], 700.00\n"
        "garbage line\n"
    )
    first, second = gpu.parse_gpu_csv(text)
    assert (first.index, first.utilization_percent, first.power_w) == (0, 100.0, 690.12)
    assert second.utilization_percent is None and second.power_w is None
    assert second.memory_total_mib == 81559


def test_compute_apps_keep_commas_in_process_names() -> None:
    processes = gpu.parse_compute_apps("4242, python -c a,b, 14870\n17, /usr/bin/Xorg, [N/A]\n")
    assert [(p.pid, p.name, p.used_memory_mib) for p in processes] == [
        (4242, "python -c a,b", 14870.0),
        (17, "/usr/bin/Xorg", None),
    ]


def test_status_sections_without_a_gpu() -> None:
    text = (
        "@@gpu\nbash: nvidia-smi: command not found\n@@apps\n@@disk\n"
        "Filesystem 1024-blocks Used Available Capacity Mounted on\n"
        "overlay 41943040 1048576 40894464 3% /\n"
        "mfs 52428800 0 52428800 0% /workspace\n"
        "@@cache /workspace/.cache/huggingface\n8388608\t/workspace/.cache/huggingface\n"
    )
    status = gpu.parse_status(text)
    assert status.gpus == [] and "not found" in (status.gpu_error or "")
    assert [(disk.mount, round(disk.free_gb, 1)) for disk in status.disks] == [
        ("/", 40.9),
        ("/workspace", 52.4),
    ]
    assert status.model_cache == "/workspace/.cache/huggingface"
    assert round(status.model_cache_gb or 0, 2) == 8.59


def test_kill_command_never_names_init() -> None:
    command = gpu.kill_command([1, 0, 4242])
    assert "for p in 4242;" in command and " 1 " not in command.split(";")[0]


class ScriptedRemote:
    """A remote whose command prints a fixed stream in pieces, like nvidia-smi -l does."""

    kind = "local"
    description = "scripted"

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def run(self, command: str, *, timeout=None, on_output=None, on_stderr=None) -> CommandResult:  # noqa: ANN001
        for piece in self.pieces:
            on_output(piece)
        return CommandResult(exit_code=0, output="".join(self.pieces))


def test_samples_are_grouped_per_round_and_counted() -> None:
    row0 = "0, NVIDIA A40, 10, 1, 46068, 30, 70.00, 300.00\n"
    row1 = "1, NVIDIA A40, 20, 2, 46068, 31, 71.00, 300.00\n"
    remote = ScriptedRemote(["2\n", row0, row1[:10], row1[10:] + row0 + row1, row0 + row1])
    rounds: list[list[int]] = []
    seen = gpu.stream_gpu_samples(
        remote,  # type: ignore[arg-type]
        lambda samples: rounds.append([sample.index for sample in samples]),
        count=2,
    )
    assert seen == 2
    assert rounds == [[0, 1], [0, 1]]
    # Without the count line, rounds still split where the GPU index wraps around.
    rounds.clear()
    unknown = ScriptedRemote([row0, row1, row0, row1, row0])
    assert (
        gpu.stream_gpu_samples(unknown, lambda s: rounds.append([x.index for x in s]), count=2) == 2
    )  # type: ignore[arg-type]
    assert rounds == [[0, 1], [0, 1]]


def test_pod_cost_is_price_times_uptime() -> None:
    pod = Pod(id="p", name="n", status=PodStatus.RUNNING, cost_per_hr=0.44, uptime_seconds=1800)
    assert pod_cost_so_far(pod) == 0.22
    assert pod_cost_so_far(pod, extra_seconds=1800) == 0.44


def test_monitor_view_shows_samples_and_ctrl_c_ends_it_cleanly() -> None:
    import io

    from rich.console import Console

    from hctl.remote.monitor import run_monitor

    class InterruptedRemote(ScriptedRemote):
        def run(self, command: str, **options: object) -> CommandResult:
            super().run(command, **options)  # type: ignore[arg-type]
            raise KeyboardInterrupt

    row = "0, NVIDIA GeForce RTX 4090, 55, 1000, 24564, 60, 200.00, 450.00\n"
    screen = io.StringIO()
    console = Console(file=screen, width=120, force_terminal=True)
    pod = Pod(id="p1", name="n", status=PodStatus.RUNNING, cost_per_hr=0.44, uptime_seconds=3600)
    shown = run_monitor(InterruptedRemote(["1\n", row]), console, pod=pod)  # type: ignore[arg-type]
    assert shown == -1
    text = screen.getvalue()
    assert "RTX 4090" in text and "55 %" in text
    assert "$0.44/h, $0.44 since it started" in text
