"""A running job, followed to its end: follow, then finish and release; also cancel.

```
follow_job   events (and the journal) by offset → progress → live view, copied home as read;
             budget cap → worker stopped right after the trial that reached it;
             a pod gone or stopped mid-search → "interrupted", resumable (`services.resume`)
complete     follow_job, then `finish.finish_job` (choose, save, upload, download, picture)
             and `finish.release_machine` (stop / terminate / keep the pod, and say which)
cancel_job   stop the worker, keep its results, release the machine
```

Every step records its outcome in the local job record, so `hctl attach` and `hctl resume`
pick up where an interrupted controller left off. The copy at home they read, the followers
that keep it in step with the machine and whether the workers still run are in `services.sync`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hctl.errors import (
    ConnectError,
    ConnectionLostError,
    HctlError,
    JobError,
    PodNotFoundError,
    PodNotReadyError,
)
from hctl.services import calibration
from hctl.services.budget import Meter
from hctl.services.estimate import format_money
from hctl.services.finish import TrialChooser, finish_job, unsaved_note
from hctl.services.fleet_follow import (
    DatabaseLostError,
    check_database_pod,
    release_pods,
    stop_workers,
)
from hctl.services.follow import Poll
from hctl.services.follow_policies import BudgetWatch, Liveness, mirror
from hctl.services.job_protocol import MAX_READ_BYTES
from hctl.services.jobs import JobRecord
from hctl.services.planning import Notify
from hctl.services.progress import JobProgress
from hctl.services.sync import follower_for, sync_job, worker_log_tail
from hctl.services.toolkit import Toolkit
from hctl.services.view import LiveView, Money
from hctl_worker.events import EVENTS_FILE, StartEvent, TrialEvent, read_events

Outcome = Literal["finished", "failed", "budget", "detached", "cancelled", "interrupted"]


@dataclass
class FollowResult:
    outcome: Outcome
    progress: JobProgress
    record: JobRecord


def meter_for(record: JobRecord, toolkit: Toolkit) -> Meter:
    started = record.started_at if record.started_at is not None else toolkit.clock()
    return Meter(
        price_per_hour=record.price_per_hour, started_at=started, spent_before=record.spent_before
    )


def money_now(record: JobRecord, progress: JobProgress, toolkit: Toolkit) -> Money:
    meter = meter_for(record, toolkit)
    now = toolkit.clock()
    fallback = progress.seconds_per_trial() or record.estimated_seconds_per_trial
    remaining = progress.remaining_seconds(fallback_per_trial=fallback)
    return Money(
        price_per_hour=record.price_per_hour,
        spent=meter.spent(now),
        projected=meter.projected(now, remaining),
        max_cost=record.max_cost,
        eta_seconds=remaining,
    )


def follow_job(
    record: JobRecord,
    toolkit: Toolkit,
    view: LiveView,
    *,
    replay: bool = True,
    poll_interval_s: float | None = None,
    restarted: bool = False,
) -> FollowResult:
    """Show the job's events until it ends (or Ctrl-C detaches); copies them home as they come.

    The local copies of the events file and of the journal are byte-exact prefixes of the
    machine's, so their sizes are the offsets to continue from: a controller killed at any moment
    resumes without a gap or a duplicate.
    """
    store = toolkit.store
    interval = (
        poll_interval_s if poll_interval_s is not None else toolkit.settings.follow_interval_s
    )
    progress = JobProgress(
        n_trials=record.n_trials, model=record.model, expected_workers=record.all_workers
    )
    old_events, offset = read_events(store.events_path(record.job_id))
    for event in old_events:
        again = _reported_again(event, progress)
        progress.apply(event)
        if replay and not again:
            view.event(event, progress, None)
    # A worker just started again: the ends of its earlier runs (or of an export) are not the
    # end; only what follows its new start event counts.
    started_again = not restarted

    def ended() -> bool:
        return progress.finished and started_again

    follower = follower_for(record, toolkit, offset, set(progress.trials), on_reconnect=view.note)
    budget = BudgetWatch(record.max_cost)
    liveness = Liveness()

    def take(poll: Poll) -> bool:
        """Copy the poll home and show its events; whether it brought a trial."""
        nonlocal started_again
        mirror(store, record, poll)
        trial_seen = False
        for event in poll.events:
            again = _reported_again(event, progress)
            progress.apply(event)
            started_again = started_again or isinstance(event, StartEvent)
            if not again:
                view.event(event, progress, money_now(record, progress, toolkit))
            trial_seen = trial_seen or isinstance(event, TrialEvent)
        return trial_seen

    try:
        while not ended():
            poll = follower.poll()
            trial_seen = take(poll)
            if trial_seen:
                note = budget.warning(money_now(record, progress, toolkit))
                if note:
                    view.note(note)
                if not ended() and budget.reached(meter_for(record, toolkit), toolkit.clock()):
                    return _stop_for_budget(record, progress, toolkit, view)
            view.refresh(progress, money_now(record, progress, toolkit))
            if ended():
                break
            if liveness.launcher_gone(poll, progress):
                _check_pod(record, toolkit)  # a pod the provider stopped: interrupted
            if liveness.ended_early(poll, progress):
                if progress.done is not None:  # another worker ended the search: it is done
                    break
                message = worker_log_tail(record, toolkit, lines=5).strip()
                view.note(f"the worker stopped without finishing; its log ends with:\n{message}")
                record = store.save(
                    record.model_copy(update={"status": "failed", "message": "worker exited early"})
                )
                return FollowResult("failed", progress, record)
            if len(poll.raw) < MAX_READ_BYTES // 2:
                toolkit.sleep(interval)
        if progress.done is not None:
            take(follower.recover())  # trials a lost pod finished but whose lines were lost
    except KeyboardInterrupt:
        return FollowResult("detached", progress, record)
    except (PodNotFoundError, PodNotReadyError) as error:
        return FollowResult("interrupted", progress, _interrupted(record, error, toolkit, view))
    finally:
        follower.close()
    outcome: Outcome = "finished" if progress.done is not None else "failed"
    if progress.error is not None:
        record = store.save(
            record.model_copy(update={"status": "failed", "message": progress.error.message})
        )
    return FollowResult(outcome, progress, record)


def _interrupted(
    record: JobRecord, error: PodNotFoundError | PodNotReadyError, toolkit: Toolkit, view: LiveView
) -> JobRecord:
    """The job's pod went away (terminated, stopped): the record says so, the user what next."""
    view.note(
        error.message
        if isinstance(error, DatabaseLostError)
        else f"the job's pod is gone or stopped ({error.message}); its journal and events "
        f"are safe on this computer: `hctl resume {record.job_id}` continues on a new pod"
    )
    return toolkit.store.save(
        record.model_copy(update={"status": "interrupted", "message": error.message})
    )


def _reported_again(event: object, progress: JobProgress) -> bool:
    """A trial already shown, reported again by another worker (the first died between its
    event and its mark in the study; on several pods the two events are in different files)."""
    return isinstance(event, TrialEvent) and event.number in progress.trials


def _check_pod(record: JobRecord, toolkit: Toolkit) -> None:
    """Raise when the job's pod is gone or no longer running (a connection may outlive it)."""
    if record.target != "pod" or record.pod_id is None:
        return
    if record.members:  # the first pod, with the study's database
        check_database_pod(record, toolkit)
        return
    pod = toolkit.provider().get(record.pod_id)
    if not pod.active:
        raise PodNotReadyError(f"Pod {pod.id} is {pod.status}.")


def _stop_for_budget(
    record: JobRecord, progress: JobProgress, toolkit: Toolkit, view: LiveView
) -> FollowResult:
    """The money spent reached the cap: stop the workers right after the trial just reported."""
    meter = meter_for(record, toolkit)
    view.note(
        f"budget reached: {format_money(meter.spent(toolkit.clock()))} spent of "
        f"{format_money(record.max_cost)}; stopping after trial {progress.trials_done} "
        "(the search so far is kept)"
    )
    stop_workers(record, toolkit, view.note)
    sync_job(record, toolkit)
    record = toolkit.store.save(
        record.model_copy(update={"status": "budget", "message": "budget cap reached"})
    )
    return FollowResult("budget", progress, record)


# --- Whole flows ----------------------------------------------------------------------------


def complete(
    record: JobRecord,
    toolkit: Toolkit,
    view: LiveView,
    *,
    worker: str,
    token: str | None,
    chooser: TrialChooser | None = None,
    replay: bool = True,
    restarted: bool = False,
) -> tuple[Outcome, JobRecord, JobProgress]:
    """Follow a running job to its end, finish it, release its machine.

    Detaching (Ctrl-C) leaves the job and its machine running, on purpose.
    """
    store = toolkit.store
    try:
        result = follow_job(record, toolkit, view, replay=replay, restarted=restarted)
    except (ConnectionLostError, ConnectError) as error:
        raise JobError(
            error.message,
            f"The job keeps running; `hctl attach {record.job_id}` reconnects. The pod keeps "
            f"billing {format_money(record.price_per_hour)}/h meanwhile.",
        ) from None
    record, progress = result.record, result.progress
    if result.outcome == "interrupted" and record.members:
        # The database is lost: the rest stop too.
        record = store.save(release_pods(record, toolkit, view.note))
    if result.outcome in {"detached", "interrupted"}:
        return result.outcome, record, progress
    try:
        if result.outcome in {"finished", "budget"}:
            record = finish_job(
                record, progress, toolkit, view.note, worker=worker, token=token, chooser=chooser
            )
            sync_job(record, toolkit)  # the export's own events, so the copy stays complete
    except (PodNotFoundError, PodNotReadyError) as error:
        # The pod went away between the search's end and the saved model: nothing was saved,
        # and `hctl resume` finishes the job on a new pod from the trials kept here.
        return "interrupted", _interrupted(record, error, toolkit, view), progress
    except HctlError as error:
        # The search is kept; `hctl attach` finishes the job again.
        failed = {"status": "failed", "message": error.message}
        store.save(release_pods(record, toolkit, view.note).model_copy(update=failed))
        raise
    except BaseException:
        # Ctrl-C while choosing or saving the trial: the search is kept, nothing was saved.
        view.note(unsaved_note(release_pods(record, toolkit, view.note)))
        raise
    record = release_pods(record, toolkit, view.note)
    status = {"finished": "finished", "budget": "budget", "failed": "failed"}[result.outcome]
    record = store.save(record.model_copy(update={"status": status}))
    if record.target == "local" and status != "failed":
        _measure_this_machine(record, toolkit)
    return result.outcome, record, progress


def _measure_this_machine(record: JobRecord, toolkit: Toolkit) -> None:
    """Keep what this job took, so the next local estimate is a measurement."""
    measurement = calibration.measure(
        toolkit.store.events(record.job_id),
        model=record.model,
        parameters=record.parameters or 1,
        response_tokens=int(record.worker_settings.get("max_response_length", 100)),
    )
    if measurement is not None and record.parameters:
        calibration.save(toolkit.store.calibration_path, measurement)


def cancel_job(record: JobRecord, toolkit: Toolkit, notify: Notify) -> JobRecord:
    """Stop the workers (every pod's; the results so far are kept) and release the machines."""
    states = stop_workers(record, toolkit, notify)
    for state in states:
        notify(
            {
                "stopped": "worker stopped",
                "killed": "worker killed: it had not stopped after SIGTERM",
                "idle": "the worker was not running",
            }[state]
        )
    if states:
        sync_job(record, toolkit)
    record = release_pods(record, toolkit, notify)
    return toolkit.store.save(record.model_copy(update={"status": "cancelled"}))


__all__ = ["EVENTS_FILE", "TrialChooser", "cancel_job", "complete", "follow_job"]
