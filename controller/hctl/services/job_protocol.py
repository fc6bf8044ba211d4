"""The job on its machine: one home for how the controller launches, reads and stops the workers
of a job directory, and for the marker files that protocol uses.

```
<job dir>/ (the worker's files: see hctl_worker.job_directory)
  launcher.pid   the shell that runs the job's workers; it lives exactly as long as they do
  worker.exit    their exit status (the first failure's, else 0), written when all have ended
  .attached      touched by every read: a pod stops itself only when nobody looked for a while
  .finishing     held while a controller exports the chosen trial
  .secrets.env   the secrets for the workers (0600), deleted before they start
  .pgpass        a job on several pods: the study's database password (0600), which the workers
                 (and an export) read through PGPASSFILE, never from a command line
  workers/K.pid  each worker's own process (written by the worker)
```

One job directory may have one worker or several (one per GPU, or `--workers N` on this
machine): they share its journal, its events file (one stream, read by byte offset as for one
worker) and its log, under one launcher. Everything here is a POSIX shell command run through a
`Remote`, so it works the same on a pod, an SSH host and this machine.
"""

from __future__ import annotations

import base64
import shlex
from dataclasses import dataclass
from typing import Literal

from hctl.errors import ConnectionLostError, JobError
from hctl.remote.base import Remote
from hctl_worker.events import (
    EVENTS_FILE,
    JOURNAL_FILE,
    LOG_FILE,
    SETTINGS_FILE,
    WORKERS_DIR,
    TrialEvent,
    decode,
)

# One read returns at most this much of each file; a long backlog arrives over a few polls.
MAX_READ_BYTES = 4 * 1024 * 1024
STATUS_MARK = "@@hctl-worker:"
JOURNAL_MARK = "@@hctl-journal"
TRIALS_MARK = "@@hctl-trials"
# Written by the shell that runs the worker (see `launch_command`); it lives exactly as
# long as the worker does, whatever the worker does with its own pid file.
LAUNCHER_PID_FILE = "launcher.pid"
EXIT_FILE = "worker.exit"  # the worker's exit status, written by the launcher when it ends
# Touched by every read: a pod only stops itself when no controller has looked for a while.
ATTACHED_FILE = ".attached"
# Present while a controller exports the chosen trial (see `self_stop_command`).
FINISHING_FILE = ".finishing"
SECRETS_FILE = ".secrets.env"
PGPASS_FILE = ".pgpass"
FINISHING_HOLD_S = 3 * 3600  # an export holds the pod up at most this long


@dataclass
class Chunk:
    """Bytes after the offsets, and whether the worker's process was alive when they were read."""

    data: bytes  # of the events file
    worker_alive: bool | None  # None: unknown (no pid file yet)
    journal: bytes = b""  # of the Optuna journal, read after the events


def running_test(job_dir: str) -> str:
    """A shell condition: true while the job's launcher (hence its worker) runs.

    The launcher writes `worker.exit` when the worker ends; a launcher killed outright fails
    `kill -0`; and one left a zombie by an init that does not reap (containers) shows state Z.
    """
    pid_file = shlex.quote(f"{job_dir}/{LAUNCHER_PID_FILE}")
    exit_file = shlex.quote(f"{job_dir}/{EXIT_FILE}")
    return (
        f'{{ [ -s {pid_file} ] && [ ! -f {exit_file} ] && kill -0 "$(cat {pid_file})" 2>/dev/null '
        f"&& ! grep -qs '^State:.*Z' \"/proc/$(cat {pid_file})/status\"; }}"
    )


def _tail(path: str, offset: int, max_bytes: int) -> str:
    return f"(tail -c +{offset + 1} {shlex.quote(path)} 2>/dev/null | head -c {max_bytes} | base64)"


def read_command(
    job_dir: str, offset: int, journal_offset: int | None = None, max_bytes: int = MAX_READ_BYTES
) -> str:
    """The shell command that prints the events after `offset`, the journal after
    `journal_offset` (read after the events, so it covers every trial they report), and whether
    the worker is alive."""
    pid = shlex.quote(f"{job_dir}/{LAUNCHER_PID_FILE}")
    journal = ""
    if journal_offset is not None:
        journal = (
            f"echo; echo '{JOURNAL_MARK}'; "
            + _tail(f"{job_dir}/{JOURNAL_FILE}", journal_offset, max_bytes)
            + "; "
        )
    attached = shlex.quote(f"{job_dir}/{ATTACHED_FILE}")
    return (
        f"touch {attached} 2>/dev/null; "
        + _tail(f"{job_dir}/{EVENTS_FILE}", offset, max_bytes)
        + f"; {journal}echo; if [ ! -f {pid} ]; then echo '{STATUS_MARK}unknown'; "
        f"elif {running_test(job_dir)}; then echo '{STATUS_MARK}alive'; "
        f"else echo '{STATUS_MARK}dead'; fi"
    )


def _decode_base64(text: str) -> bytes:
    # Drop the line breaks (and a PTY's carriage returns) between base64 blocks first.
    cleaned = "".join(character for character in text if not character.isspace())
    return base64.b64decode(cleaned) if cleaned else b""


def parse_read_output(output: str) -> Chunk:
    """Decode what `read_command` printed; a reply without the status line was cut short."""
    encoded, mark, status = output.partition(STATUS_MARK)
    if not mark:
        raise ConnectionLostError("The reply to an event read was cut short.")
    events, _, journal = encoded.partition(JOURNAL_MARK)
    state = status.strip().split()[0] if status.strip() else "unknown"
    alive = {"alive": True, "dead": False}.get(state)
    return Chunk(data=_decode_base64(events), worker_alive=alive, journal=_decode_base64(journal))


def study_trials_command(worker: str, job_dir: str) -> str:
    """The shell command that prints every finished trial of the job's study as trial events
    (base64, after a mark, so a PTY cannot mangle them), or the worker's error and its status."""
    command = f"{worker} trials --job-dir {shlex.quote(job_dir)} --events"
    return with_database_password(
        job_dir,
        f'err=$(mktemp); if out=$({command} 2>"$err"); then rm -f "$err"; '
        f"echo '{TRIALS_MARK}'; printf '%s\\n' \"$out\" | base64; "
        'else status=$?; tail -n 5 "$err"; rm -f "$err"; exit $status; fi',
    )


def parse_study_trials(output: str) -> list[TrialEvent]:
    """Decode what `study_trials_command` printed; a reply without its mark was cut short."""
    _, mark, encoded = output.rpartition(TRIALS_MARK)
    if not mark:
        raise ConnectionLostError("The reply listing the study's trials was cut short.")
    events = (decode(line) for line in _decode_base64(encoded).splitlines() if line.strip())
    return [event for event in events if isinstance(event, TrialEvent)]


def check_not_running(remote: Remote, job_dir: str) -> None:
    """Refuse to start a second worker in a job directory whose worker still runs (its launcher
    lives exactly as long as it does; a worker started by hand there is refused by the worker's
    own lock on the events file)."""
    result = remote.run(f"if {running_test(job_dir)}; then echo busy; fi", timeout=30)
    if "busy" in result.output:
        raise JobError(
            f"A worker is already running in {job_dir} on {remote.description}.",
            "Let it finish (`hctl jobs` shows it; `hctl attach JOB` follows it), stop it with "
            "`hctl cancel JOB`, or give this run another --output folder.",
        )


# --- Launching --------------------------------------------------------------------------------


def with_secrets(job_dir: str, command: str) -> str:
    """Run `command` with the secrets file's variables, deleting the file before it starts.

    The secrets never appear in argv: they are read by the shell from a 0600 file inside the
    job directory (itself 0700), which is gone before the command runs. A database password
    file (`.pgpass`, a job on several pods) stays, and the command finds it through PGPASSFILE.
    """
    secrets = shlex.quote(f"{job_dir}/{SECRETS_FILE}")
    return f"if [ -f {secrets} ]; then . {secrets}; rm -f {secrets}; fi; " + with_database_password(
        job_dir, command
    )


def with_database_password(job_dir: str, command: str) -> str:
    """Run `command` finding the study's database password (a job on several pods) through
    PGPASSFILE; the secrets file, if any, is left for the command it was written for."""
    pgpass = shlex.quote(f"{job_dir}/{PGPASS_FILE}")
    return f"if [ -f {pgpass} ]; then export PGPASSFILE={pgpass}; fi; {command}"


def self_stop_command(job_dir: str, grace_s: float, stop_command: str) -> str:
    """After the worker exits, stop the pod from inside unless a controller is looking after it.

    This is the dead-man switch for a detached job: when nobody follows the job (the laptop
    slept, the controller was killed), the pod stops itself `grace_s` seconds after the worker
    ends instead of billing until its lease. A following controller touches `.attached` on every
    read and holds `.finishing` while it exports, so it keeps the pod up for as long as it needs;
    a worker started again in the job directory (a resume) keeps it up too.
    `stop_command` is the provider's (`Provider.self_stop_command`): it acts with the pod's own
    identity and credentials, and does nothing where there are none. Stopping (not terminating)
    keeps the volume, so `hctl resume` can finish the job.
    """
    quoted = shlex.quote(job_dir)
    grace = int(grace_s)
    return (
        f"sleep {grace}; while :; do now=$(date +%s); "
        f"seen=$(stat -c %Y {quoted}/{ATTACHED_FILE} 2>/dev/null || echo 0); "
        f"held=$(stat -c %Y {quoted}/{FINISHING_FILE} 2>/dev/null || echo 0); "
        f"if [ $((now - seen)) -lt {grace} ] || [ $((now - held)) -lt {FINISHING_HOLD_S} ] "
        f"|| {running_test(job_dir)}; "
        f"then sleep {min(30, max(1, grace))}; else break; fi; done; "
        f'echo "hctl: no controller attached; stopping this pod" >>{quoted}/{LOG_FILE}; '
        f"{{ {stop_command}; }} >>{quoted}/{LOG_FILE} 2>&1"
    )


def launch_command(
    worker: str,
    job_dir: str,
    *,
    env: dict[str, str] | None = None,
    self_stop_after_s: float | None = None,
    stop_command: str | None = None,
    workers: int = 1,
    one_gpu_each: bool = False,
    first_worker: int = 1,
    storage: str | None = None,
) -> str:
    """Start the job's workers detached: their own session, no terminal, output to the log.

    A small shell (the launcher) runs the workers and records its own pid in `launcher.pid`, and
    their exit status in `worker.exit` (the first failure's, else 0) once every one has ended:
    that pid lives exactly as long as the workers, so the follower can tell a finished or
    crashed job from a running one. `workers` > 1 runs that many workers on the one job
    directory, named 1, 2, ... (they share its journal, events and log); with `one_gpu_each`,
    worker K sees only GPU K-1 (`CUDA_VISIBLE_DEVICES`). `setsid` puts the launcher in a session
    of its own, so neither a dropped connection nor the end of this SSH session can reach it.
    With `self_stop_after_s` and the provider's `stop_command`, the pod stops itself when the
    workers have ended and nobody is attached (see `self_stop_command`). With `storage` (a
    database URL without its password) the study is there and the workers are named from
    `first_worker` on, so the workers of several pods have different names.
    """
    quoted = shlex.quote(job_dir)
    exports = "".join(
        f"export {name}={shlex.quote(value)}; " for name, value in (env or {}).items()
    )
    after = ""
    if self_stop_after_s is not None and stop_command is not None:
        after = f"; ({self_stop_command(job_dir, self_stop_after_s, stop_command)}) &"
    run = f"{worker} run --config {quoted}/{SETTINGS_FILE} --job-dir {quoted} --events"
    if storage is not None:
        run += f" --storage {shlex.quote(storage)}"
    log = f">>{quoted}/{LOG_FILE} 2>&1"
    if workers == 1 and not one_gpu_each and storage is None:
        body = f"{run} {log}; echo $? >{quoted}/{EXIT_FILE}"
    else:
        starts = "".join(
            (f"CUDA_VISIBLE_DEVICES={index} " if one_gpu_each else "")
            + f"{run} --worker {first_worker + index} {log} & P{index}=$!; "
            for index in range(workers)
        )
        waits = " ".join(f"$P{index}" for index in range(workers))
        body = (
            f"{starts}X=0; for P in {waits}; do wait $P; E=$?; "
            f'[ "$X" = 0 ] && X=$E; done; echo $X >{quoted}/{EXIT_FILE}'
        )
    inner = f"echo $$ >{quoted}/{LAUNCHER_PID_FILE}; {body}{after}"
    detach = "if command -v setsid >/dev/null 2>&1; then S=setsid; else S=nohup; fi; "
    start = f"$S sh -c {shlex.quote(inner)} >/dev/null 2>&1 </dev/null &"
    wait_for_pid = (
        f"for i in 1 2 3 4 5 6 7 8 9 10; do [ -s {quoted}/{LAUNCHER_PID_FILE} ] && break; "
        "sleep 0.1; done; "
        f"cat {quoted}/{LAUNCHER_PID_FILE}"
    )
    # A subshell, so nothing (the directory, the secrets) lingers in a persistent PTY shell.
    return (
        f"(cd {quoted} && rm -f {quoted}/{LAUNCHER_PID_FILE} {quoted}/{EXIT_FILE} && {exports}"
        + with_secrets(job_dir, f"{detach}{start}")
        + f" {wait_for_pid})"
    )


# --- Stopping ---------------------------------------------------------------------------------


def signal_worker(remote: Remote, job_dir: str, signal: Literal["TERM", "KILL"] = "TERM") -> bool:
    """Send the worker a signal; False when it was not running.

    SIGTERM asks it to stop (it ends the current trial as failed and exits, and a resumed search
    runs that trial again). SIGKILL goes to the whole session the launcher started (the worker
    and anything it started), for a worker stuck where it cannot take a SIGTERM.
    """
    launcher_pid = shlex.quote(f"{job_dir}/{LAUNCHER_PID_FILE}")
    group = f'kill -{signal} -- "-$(cat {launcher_pid})" 2>/dev/null'
    also_group = f"{group}; " if signal == "KILL" else ""
    result = remote.run(
        f"{live_workers(job_dir)}; "
        f'if [ -n "$ALIVE" ]; then {also_group}kill -{signal} $ALIVE; echo stopped; '
        f"elif {running_test(job_dir)}; then "
        f'{group} || kill -{signal} "$(cat {launcher_pid})"; '
        "echo stopped; else echo idle; fi",
        timeout=30,
    )
    return "stopped" in result.output


def live_workers(job_dir: str) -> str:
    """A shell snippet that sets ALIVE to the live processes among the job's workers (each
    worker's pid file; `worker.pid` of jobs from before several workers could share one)."""
    quoted = shlex.quote(job_dir)
    return (
        f"ALIVE=; for P in $(cat {quoted}/{WORKERS_DIR}/*.pid {quoted}/worker.pid 2>/dev/null); "
        'do kill -0 "$P" 2>/dev/null && ALIVE="$ALIVE $P"; done'
    )
