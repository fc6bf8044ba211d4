"""Stopping a job's worker for good, and telling whether it has stopped.

`stop_worker` sends SIGTERM (the worker ends its current trial as failed and exits; a resumed
search runs that trial again), waits `STOP_GRACE_S`, and then sends SIGKILL to the launcher's
whole session: a worker inside one long computation (a forward pass over a huge prompt, a model
load) cannot take the SIGTERM until that computation ends. It raises rather than report a worker
stopped that still runs.
"""

from __future__ import annotations

import shlex
from typing import Literal

from hctl.errors import JobError
from hctl.remote.base import Remote
from hctl.services.follow import LAUNCHER_PID_FILE, RemoteJobChannel, running_test
from hctl.services.toolkit import Toolkit
from hctl_worker.events import PID_FILE

STOP_GRACE_S = 30.0  # a SIGTERM'd worker gets this long to end its trial before SIGKILL
KILL_WAIT_S = 15.0


def signal_worker(remote: Remote, job_dir: str, signal: Literal["TERM", "KILL"] = "TERM") -> bool:
    """Send the worker a signal; False when it was not running.

    SIGTERM asks it to stop (it ends the current trial as failed and exits, and a resumed search
    runs that trial again). SIGKILL goes to the whole session the launcher started (the worker
    and anything it started), for a worker stuck where it cannot take a SIGTERM.
    """
    worker_pid = shlex.quote(f"{job_dir}/{PID_FILE}")
    launcher_pid = shlex.quote(f"{job_dir}/{LAUNCHER_PID_FILE}")
    group = f'kill -{signal} -- "-$(cat {launcher_pid})" 2>/dev/null'
    also_group = f"{group}; " if signal == "KILL" else ""
    result = remote.run(
        f'if [ -f {worker_pid} ] && kill -0 "$(cat {worker_pid})" 2>/dev/null; then '
        f'{also_group}kill -{signal} "$(cat {worker_pid})"; echo stopped; '
        f"elif {running_test(job_dir)}; then "
        f'{group} || kill -{signal} "$(cat {launcher_pid})"; '
        "echo stopped; else echo idle; fi",
        timeout=30,
    )
    return "stopped" in result.output


def stop_worker(
    remote: Remote, job_dir: str, toolkit: Toolkit
) -> Literal["stopped", "killed", "idle"]:
    """Stop the worker for good: SIGTERM, then SIGKILL when it has not exited `STOP_GRACE_S`
    later (a worker inside one long computation cannot take the SIGTERM until it ends).

    Returns what it took; raises JobError when the worker is still running after both, so a job
    is never reported stopped while its worker goes on.
    """
    if not signal_worker(remote, job_dir, "TERM"):
        return "idle"
    channel = RemoteJobChannel(remote, job_dir)
    if wait_for_worker_exit(channel, toolkit, timeout_s=STOP_GRACE_S):
        return "stopped"
    signal_worker(remote, job_dir, "KILL")
    if wait_for_worker_exit(channel, toolkit, timeout_s=KILL_WAIT_S):
        return "killed"
    raise JobError(
        f"The worker in {job_dir} is still running after SIGTERM and SIGKILL.",
        f"Look at it on its machine (`hctl exec ... -- cat {shlex.quote(f'{job_dir}/{PID_FILE}')}`)"
        " and end it by hand; the job is not marked stopped.",
    )


def wait_for_worker_exit(
    channel: RemoteJobChannel, toolkit: Toolkit, *, timeout_s: float = 120.0
) -> bool:
    """Wait (bounded) until a signalled worker has exited; True when it has."""
    deadline = toolkit.clock() + timeout_s
    while toolkit.clock() < deadline:
        if channel.read(10**15).worker_alive is not True:
            return True
        toolkit.sleep(0.25)
    return False
