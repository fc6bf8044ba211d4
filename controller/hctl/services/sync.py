"""A running job's copy at home, kept in step with its machine, and what else is asked of it.

```
local_progress   the progress the events copied home show
follower_for     the reader of the machine's events that also mirrors its journal home
                 (a job on several pods: one `FleetFollower` over every pod)
sync_job         copy home, once and best effort, whatever is not home yet
worker_alive     whether the job's workers run now (any pod's)
worker_log_tail  the end of the workers' log (every pod's)
```

The copy at home is a byte-exact prefix of the machine's files, so its sizes are the offsets a
follower continues from (see `hctl.services.follow`); `runs.follow_job` follows a job with the
same followers until it ends.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any

from hctl.errors import HctlError
from hctl.services.fleet import pod_views
from hctl.services.fleet_follow import FleetFollower, any_alive, trial_numbers
from hctl.services.follow import Follower, RemoteJobChannel
from hctl.services.follow_policies import mirror
from hctl.services.jobs import JobRecord
from hctl.services.progress import JobProgress
from hctl.services.toolkit import Toolkit
from hctl_worker.events import LOG_FILE, read_events


def local_progress(record: JobRecord, toolkit: Toolkit) -> JobProgress:
    """The progress the local copy of the events shows."""
    progress = JobProgress(
        n_trials=record.n_trials, model=record.model, expected_workers=record.all_workers
    )
    events, _ = read_events(toolkit.store.events_path(record.job_id))
    for event in events:
        progress.apply(event)
    return progress


def follower_for(
    record: JobRecord, toolkit: Toolkit, offset: int, shown: set[int], **options: Any
) -> Follower | FleetFollower:
    """A follower of the job's events from `offset`, mirroring its journal after the copy home;
    a job on several pods: one for all its pods (each pod from its own copy's size), told the
    trials the copy home already holds (`shown`)."""
    if record.members:
        notify = options.get("on_reconnect") or (lambda message: None)
        return FleetFollower(
            record,
            toolkit,
            lambda view, start: Follower(
                channel_factory(view, toolkit),
                offset=start,
                sleep=toolkit.sleep,
                clock=toolkit.clock,
                give_up_after_s=0,
            ),  # fmt: skip
            notify,
            shown,
        )
    return Follower(
        channel_factory(record, toolkit),
        offset=offset,
        journal_offset=toolkit.store.journal_size(record.job_id),
        sleep=toolkit.sleep,
        clock=toolkit.clock,
        **options,
    )


def channel_factory(record: JobRecord, toolkit: Toolkit) -> Callable[[], RemoteJobChannel]:
    return lambda: RemoteJobChannel(toolkit.connect(record), record.remote_job_dir)


def sync_job(record: JobRecord, toolkit: Toolkit) -> bool:
    """Copy any events and journal lines not yet home (once, best effort); False when the
    machine cannot be reached."""
    store = toolkit.store
    events, offset = read_events(store.events_path(record.job_id))
    try:
        follower = follower_for(record, toolkit, offset, trial_numbers(events), give_up_after_s=0)
        try:
            while True:
                poll = follower.poll()
                mirror(store, record, poll)
                if not poll.raw and not poll.journal_raw:
                    break
        finally:
            follower.close()
    except HctlError:
        return False
    return True


def worker_alive(record: JobRecord, toolkit: Toolkit) -> bool | None:
    """Whether the job's workers run now (any pod's); None when no machine can be reached."""
    if record.members:
        return any_alive(record, lambda view: worker_alive(view, toolkit))
    try:
        channel = channel_factory(record, toolkit)()
    except HctlError:
        return None
    try:
        return channel.read(10**15).worker_alive is True
    except HctlError:
        return None
    finally:
        channel.close()


def worker_log_tail(record: JobRecord, toolkit: Toolkit, *, lines: int = 50) -> str:
    """The end of the workers' log (of every pod, for a job on several)."""
    if not record.members:
        return _log_tail(record, toolkit, lines)
    tails = []
    for view in pod_views(record, with_lost=True):
        try:
            tail = _log_tail(view, toolkit, lines)
        except HctlError as error:
            tail = f"(not reachable: {error.message})\n"
        tails.append(f"pod {view.pod_id}:\n{tail}")
    return "".join(tails)


def _log_tail(record: JobRecord, toolkit: Toolkit, lines: int) -> str:
    remote = toolkit.connect(record)
    try:
        path = shlex.quote(f"{record.remote_job_dir}/{LOG_FILE}")
        return remote.run(f"tail -n {int(lines)} {path} 2>/dev/null", timeout=60).output
    finally:
        remote.close()
