"""Commands that reach a machine: exec, connect, setup, status, monitor, gpu-free, doctor, ssh-config.

TARGET everywhere is a pod id or name, `ssh://USER@HOST:PORT`, or `local`; left out, it is the
only running hctl pod (see `hctl.targets`). `--pty` forces the PTY path that RunPod's proxy
needs (automatic for the proxy's address).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import typer

from hctl.cli.common import confirm, console, error_console
from hctl.errors import ConfigError, ConnectError, PodNotReadyError
from hctl.output import (
    OUTPUT_CLOSED_EXIT,
    Column,
    HctlCommand,
    OutputClosed,
    json_option,
    print_json,
    print_line,
    print_remark,
    print_table,
    silence_closed_output,
    stream_to,
)
from hctl.remote.base import Remote
from hctl.settings import hctl_home, load_settings

TARGET_HELP = "Pod id or name, ssh://USER@HOST:PORT, or `local` (default: the only running pod)."
PTY_HELP = "Go through a PTY shell, as RunPod's proxy requires (automatic for ssh.runpod.io)."


class DashDashCommand(HctlCommand):
    """Keeps everything after `--` for the command itself, so `-la` is never an hctl option."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        if "--" in args:
            index = args.index("--")
            ctx.meta["hctl_after_dashes"] = args[index + 1 :]
            args = args[:index]
        return super().parse_args(ctx, args)


def _note(message: str) -> None:
    print_line(message, style="dim", output=error_console)


def _open(target: str | None, pty: bool = False) -> tuple[Remote, Any]:
    from hctl.targets import open_target

    return open_target(target, load_settings(), force_pty=pty, on_message=_note)


def exec_command(
    ctx: typer.Context,
    words: list[str] = typer.Argument(None, help="[TARGET] -- COMMAND...", show_default=False),
    pty: bool = typer.Option(False, "--pty", help=PTY_HELP),
    timeout: float = typer.Option(None, "--timeout", help="Give up after this many seconds."),
) -> None:
    """Run a command on a machine, streaming its output; exits with the command's exit code.

    hctl exec TARGET -- nvidia-smi  ·  hctl exec -- 'df -h /workspace'
    """
    after = ctx.meta.get("hctl_after_dashes")
    before = list(words or [])
    if after is None:  # no `--`: the first word is the target, the rest the command
        target, command_words = (before[0] if before else None), before[1:]
    else:
        if len(before) > 1:
            raise ConfigError(f"Too many targets: {' '.join(before)}", "Put the command after --.")
        target, command_words = (before[0] if before else None), after
    if not "".join(command_words).strip():
        raise ConfigError("No command given.", "Write it after --, e.g. hctl exec -- nvidia-smi")
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        # Checked before the command runs: 0 or less would run it and then call it timed out.
        raise ConfigError(
            f"--timeout {timeout:g} is not a number of seconds.", "E.g. --timeout 60."
        )
    remote, _pod = _open(target, pty)
    try:
        result = remote.run(
            " ".join(command_words),
            timeout=timeout,
            on_output=stream_to(sys.stdout),
            on_stderr=stream_to(sys.stderr),
        )
    except OutputClosed:
        # The reader went away (`| head -1`): the remote stopped the command; end quietly.
        silence_closed_output()
        raise typer.Exit(OUTPUT_CLOSED_EXIT) from None
    finally:
        remote.close()
    raise typer.Exit(result.exit_code)


def connect(
    target: str = typer.Argument(None, help=TARGET_HELP, show_default=False),
    pty: bool = typer.Option(False, "--pty", help=PTY_HELP),
) -> None:
    """Open an interactive shell on a machine (Ctrl-C goes to the remote side; `exit` leaves)."""
    from hctl.remote.interactive import interactive_shell

    remote, _pod = _open(target, pty)
    try:
        status = interactive_shell(remote)
    finally:
        remote.close()
    raise typer.Exit(status)


def setup(
    target: str = typer.Argument(None, help=TARGET_HELP, show_default=False),
    pty: bool = typer.Option(False, "--pty", help=PTY_HELP),
    reinstall: bool = typer.Option(False, "--reinstall", help="Install even if it is there."),
    python: str = typer.Option(None, "--python", help="The machine's Python to install with."),
) -> None:
    """Install the worker of this exact hctl version on a machine (fast when it is there)."""
    from hctl.setup import ensure_worker

    settings = load_settings()
    remote, _pod = _open(target, pty)
    try:
        info = ensure_worker(remote, settings, python=python, reinstall=reinstall, on_message=_note)
    finally:
        remote.close()
    state = "installed" if info.installed else "already installed"
    print_line(f"hctl-worker {info.version} {state} on {remote.description}: {info.command}")
    print_line(
        f"python {info.python} · torch {info.torch} (CUDA {info.cuda or 'none'}) · "
        f"transformers {info.transformers} · accelerate {info.accelerate}"
    )
    for name, value in info.environment.items():
        print_line(f"{name}={value}")


def status(
    target: str = typer.Argument(None, help=TARGET_HELP, show_default=False),
    pty: bool = typer.Option(False, "--pty", help=PTY_HELP),
    as_json: bool = json_option(),
) -> None:
    """GPU, memory, utilisation, processes on the GPU, free disk and the model cache's size."""
    from hctl.remote.gpu import machine_status
    from hctl.remote.monitor import cost_line, model_cache_line, status_sections

    remote, pod = _open(target, pty)
    try:
        report = machine_status(remote, load_settings().volume_path)
    finally:
        remote.close()
    if as_json:
        print_json({"machine": remote.description, "pod": pod.id if pod else None,
                    **report.model_dump(mode="json")})  # fmt: skip
        return
    # At a terminal, tables; piped, each table's tab-separated lines (titles and remarks on
    # stderr). --json is the whole report for scripts.
    print_remark(remote.description)
    for section in status_sections(report):
        if section.rows:
            print_table(section.columns, section.rows, title=section.title)
        else:
            print_remark(section.empty)
    cache = model_cache_line(report)
    if cache is not None:
        print_remark(cache)
    if pod is not None:
        print_remark(cost_line(pod).plain)


def monitor(
    target: str = typer.Argument(None, help=TARGET_HELP, show_default=False),
    pty: bool = typer.Option(False, "--pty", help=PTY_HELP),
    count: int = typer.Option(None, "--count", min=1, help="Stop after this many samples."),
    interval: int = typer.Option(1, "--interval", min=1, help="Seconds between samples."),
) -> None:
    """Live GPU utilisation, memory, temperature and power (and the pod's cost); Ctrl-C exits.

    A pod SSH cannot reach yet shows the GPU use RunPod reports instead."""
    from hctl.remote.monitor import monitor_through_api, run_monitor

    try:
        remote, pod = _open(target, pty)
        try:
            run_monitor(remote, console, pod=pod, count=count, interval_s=interval)
        finally:
            remote.close()
    except OutputClosed:
        silence_closed_output()
        raise typer.Exit(OUTPUT_CLOSED_EXIT) from None
    except (PodNotReadyError, ConnectError) as error:
        _note(f"{error.message} Showing the GPU use RunPod reports instead.")
        settings = load_settings()
        if not monitor_through_api(target, settings, console, count=count, interval_s=interval):
            raise


def gpu_free(
    target: str = typer.Argument(None, help=TARGET_HELP, show_default=False),
    pty: bool = typer.Option(False, "--pty", help=PTY_HELP),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Stop the processes holding GPU memory (only those nvidia-smi lists, never init)."""
    from hctl.remote.gpu import PROTECTED_PIDS, free_gpu_memory, gpu_processes

    remote, _pod = _open(target, pty)
    try:
        processes = [p for p in gpu_processes(remote) if p.pid not in PROTECTED_PIDS]
        if not processes:
            print_line("No process holds GPU memory.")
            return
        print_table(
            [Column("pid", justify="right"), Column("process", whole=True),
             Column("memory", justify="right")],
            [[str(p.pid), p.name, f"{p.used_memory_mib or 0:.0f} MiB"] for p in processes],
        )  # fmt: skip
        confirm(f"Stop these {len(processes)} process(es)?", assume_yes=yes)
        stopped = free_gpu_memory(remote, processes)
    finally:
        remote.close()
    print_line(f"Stopped {len(stopped)} of {len(processes)}: {' '.join(map(str, stopped))}")
    if len(stopped) < len(processes):
        raise typer.Exit(1)


def doctor(as_json: bool = json_option()) -> None:
    """Check the SSH key, the API key, the API and every running pod; say how to fix each."""
    from hctl.providers import make_provider
    from hctl.remote.doctor import run_doctor

    settings = load_settings()
    # One try, no retries: a check should say "unreachable" at once, not after a minute.
    quick = settings.model_copy(update={"api_retries": 0, "api_timeout_s": 10.0})
    checks = run_doctor(settings, lambda: make_provider(quick))
    failed = [check for check in checks if not check.ok]
    if as_json:
        print_json([check.model_dump() for check in checks])
    else:
        print_table(
            [Column(""), Column("check", whole=True), Column("detail"), Column("fix")],
            [["ok" if check.ok else "FAIL", check.name, check.detail,
              "" if check.ok else check.fix] for check in checks],
        )  # fmt: skip
        if failed:
            print_line(f"{len(failed)} check(s) failed.", style="red", output=error_console)
        else:
            print_line("Everything hctl needs is in place.")
    if failed:
        raise typer.Exit(1)


def ssh_config(
    target: str = typer.Argument(None, help=TARGET_HELP, show_default=False),
    name: str = typer.Option(None, "--name", help="The Host alias (default: hctl-<pod name>)."),
    print_only: bool = typer.Option(False, "--print", help="Print the entry instead of writing."),
) -> None:
    """Write a Host entry into ~/.ssh/config so ssh, scp and VS Code reach the machine."""
    from hctl.remote.ssh_config import write_host_entry
    from hctl.targets import host_entry_for

    entry = host_entry_for(target, load_settings(), alias=name)
    if print_only:
        console.out(entry.render(), end="", highlight=False)
        return
    changed = write_host_entry(entry)
    state = "written" if changed else "already up to date"
    print_line(f"Host {entry.alias} {state} in ~/.ssh/config: try `ssh {entry.alias}`.")


def forget_host(
    name: str = typer.Argument(..., help="A name `hctl` printed, e.g. [1.2.3.4]:22"),
) -> None:
    """Forget a recorded SSH host key (after a machine was legitimately rebuilt)."""
    from hctl.remote.hostkeys import KnownHosts

    known = KnownHosts()
    if not known.forget(name):
        raise ConfigError(
            f"No host key recorded under {name!r}.",
            f"Recorded: {', '.join(known.names()) or 'none'} (in {hctl_home() / 'known_hosts'}).",
        )
    print_line(f"Forgot the host key of {name}; the next connection records the new one.")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `hctl` application."""
    app.command("exec", cls=DashDashCommand)(exec_command)
    app.command("connect", cls=HctlCommand)(connect)
    app.command("setup", cls=HctlCommand)(setup)
    app.command("status", cls=HctlCommand)(status)
    app.command("monitor", cls=HctlCommand)(monitor)
    app.command("gpu-free", cls=HctlCommand)(gpu_free)
    app.command("doctor", cls=HctlCommand)(doctor)
    app.command("ssh-config", cls=HctlCommand)(ssh_config)
    app.command("forget-host", cls=HctlCommand)(forget_host)
