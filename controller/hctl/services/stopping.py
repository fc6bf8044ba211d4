"""Stopping a job's workers (one or several) for good, and telling whether it has stopped.

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
from hctl.services.follow import RemoteJobChannel
from hctl.services.job_protocol import signal_worker
from hctl.services.toolkit import Toolkit
from hctl_worker.events import WORKERS_DIR

STOP_GRACE_S = 30.0  # a SIGTERM'd worker gets this long to end its trial before SIGKILL
KILL_WAIT_S = 15.0


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
        f"Look at it on its machine (`hctl exec ... -- cat {shlex.quote(job_dir)}/{WORKERS_DIR}/*.pid`)"
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
