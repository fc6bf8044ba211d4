"""A job from the worker's start to the pod's stop: follow, finish, release; attach, resume, cancel.

```
follow_job   events by offset → progress → live view; journal copied home after each trial;
             budget cap → worker stopped right after the trial that reached it
finish_job   Pareto front → chosen trial → export on the machine (save / upload) → download;
             the front as a table and as an SVG picture
release      stop (default), terminate or keep the pod, and say which and what it costs
```

Every step records its outcome in the local job record, so `hctl attach` and `hctl resume`
pick up where an interrupted controller left off.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hctl.errors import (
    ConnectError,
    ConnectionLostError,
    HctlError,
    JobError,
    PodNotFoundError,
    PodNotReadyError,
)
from hctl.remote.base import Remote
from hctl.services.budget import Meter
from hctl.services.estimate import format_money
from hctl.services.follow import LAUNCHER_PID_FILE, MAX_READ_BYTES, Follower, RemoteJobChannel
from hctl.services.jobs import JobRecord
from hctl.services.launch import (
    Notify,
    hf_token,
    release_after_failure,
    upload_secrets,
    with_secrets,
)
from hctl.services.pareto_plot import save_svg
from hctl.services.progress import JobProgress, choose_trial
from hctl.services.toolkit import Toolkit
from hctl.services.view import LiveView, Money
from hctl_worker.events import (
    EVENTS_FILE,
    JOURNAL_FILE,
    LOG_FILE,
    PID_FILE,
    ParetoTrial,
    TrialEvent,
    read_events,
)

Outcome = Literal["finished", "failed", "budget", "detached", "cancelled", "interrupted"]
# Ask the user to pick a trial of the front; None means "let hctl choose".
TrialChooser = Callable[[list[ParetoTrial], ParetoTrial | None], int | None]

EXPORT_TIMEOUT_S = 3 * 3600


@dataclass
class FollowResult:
    outcome: Outcome
    progress: JobProgress
    record: JobRecord


def local_progress(record: JobRecord, toolkit: Toolkit) -> JobProgress:
    """The progress the local copy of the events shows."""
    progress = JobProgress(n_trials=record.n_trials, model=record.model)
    events, _ = read_events(toolkit.store.events_path(record.job_id))
    for event in events:
        progress.apply(event)
    return progress


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


def channel_factory(record: JobRecord, toolkit: Toolkit) -> Callable[[], RemoteJobChannel]:
    return lambda: RemoteJobChannel(toolkit.connect(record), record.remote_job_dir)


def stop_worker(remote: Remote, job_dir: str) -> bool:
    """Ask the worker to stop (SIGTERM: it ends the current trial as failed and exits, and a
    resumed search runs that trial again); False when it was not running."""
    worker_pid = shlex.quote(f"{job_dir}/{PID_FILE}")
    launcher_pid = shlex.quote(f"{job_dir}/{LAUNCHER_PID_FILE}")
    result = remote.run(
        f'if [ -f {worker_pid} ] && kill -0 "$(cat {worker_pid})" 2>/dev/null; then '
        f'kill -TERM "$(cat {worker_pid})"; echo stopped; '
        f'elif [ -f {launcher_pid} ] && kill -0 "$(cat {launcher_pid})" 2>/dev/null; then '
        f'kill -TERM -- "-$(cat {launcher_pid})" 2>/dev/null || kill -TERM "$(cat {launcher_pid})"; '
        "echo stopped; else echo idle; fi",
        timeout=30,
    )
    return "stopped" in result.output


def follow_job(
    record: JobRecord,
    toolkit: Toolkit,
    view: LiveView,
    *,
    replay: bool = True,
    poll_interval_s: float | None = None,
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
    progress = JobProgress(n_trials=record.n_trials, model=record.model)
    old_events, offset = read_events(store.events_path(record.job_id))
    for event in old_events:
        progress.apply(event)
        if replay:
            view.event(event, progress, None)
    follower = Follower(
        channel_factory(record, toolkit),
        offset=offset,
        journal_offset=store.journal_size(record.job_id),
        sleep=toolkit.sleep,
        clock=toolkit.clock,
        on_reconnect=view.note,
    )
    dead_polls = 0
    warned_projection = False
    try:
        while not progress.finished:
            poll = follower.poll()
            store.append_journal(record.job_id, poll.journal_raw)
            store.append_events(record.job_id, poll.raw)
            trial_seen = False
            for event in poll.events:
                progress.apply(event)
                view.event(event, progress, money_now(record, progress, toolkit))
                trial_seen = trial_seen or isinstance(event, TrialEvent)
            meter = meter_for(record, toolkit)
            money = money_now(record, progress, toolkit)
            if (
                trial_seen
                and not warned_projection
                and record.max_cost is not None
                and money.projected > record.max_cost
            ):
                warned_projection = True
                view.note(
                    f"at this pace the job would cost {format_money(money.projected)}, above the "
                    f"{format_money(record.max_cost)} cap: it will stop after the trial that "
                    "reaches the cap"
                )
            if (
                trial_seen
                and not progress.finished
                and meter.cap_reached(toolkit.clock(), record.max_cost)
            ):
                return _stop_for_budget(record, progress, toolkit, view, meter)
            view.refresh(progress, money_now(record, progress, toolkit))
            if progress.finished:
                break
            # A worker that has started and now has no live launcher (or no job directory at
            # all: a pod whose volume is gone) has ended; so has a pod the provider stopped.
            ended = poll.worker_alive is False or (poll.worker_alive is None and progress.starts)
            if ended and not poll.events:
                _check_pod(record, toolkit)
                # Read once more: the last events may have landed just before the worker exited.
                dead_polls += 1
                if dead_polls >= 2:
                    message = worker_log_tail(record, toolkit, lines=5).strip()
                    view.note(
                        f"the worker stopped without finishing; its log ends with:\n{message}"
                    )
                    record = store.save(
                        record.model_copy(
                            update={"status": "failed", "message": "worker exited early"}
                        )
                    )
                    return FollowResult("failed", progress, record)
            else:
                dead_polls = 0
            if len(poll.raw) < MAX_READ_BYTES // 2:
                toolkit.sleep(interval)
    except KeyboardInterrupt:
        return FollowResult("detached", progress, record)
    except (PodNotFoundError, PodNotReadyError) as error:
        view.note(
            f"the job's pod is gone or stopped ({error.message}); its journal and events are "
            f"safe on this computer: `hctl resume {record.job_id}` continues on a new pod"
        )
        record = store.save(
            record.model_copy(update={"status": "interrupted", "message": error.message})
        )
        return FollowResult("interrupted", progress, record)
    finally:
        follower.close()
    outcome: Outcome = "finished" if progress.done is not None else "failed"
    if progress.error is not None:
        record = store.save(
            record.model_copy(update={"status": "failed", "message": progress.error.message})
        )
    return FollowResult(outcome, progress, record)


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


def _check_pod(record: JobRecord, toolkit: Toolkit) -> None:
    """Raise when the job's pod is gone or no longer running (a connection may outlive it)."""
    if record.target != "pod" or record.pod_id is None:
        return
    pod = toolkit.provider().get(record.pod_id)
    if pod.status != "RUNNING":
        raise PodNotReadyError(f"Pod {pod.id} is {pod.status}.")


def _stop_for_budget(
    record: JobRecord, progress: JobProgress, toolkit: Toolkit, view: LiveView, meter: Meter
) -> FollowResult:
    """The money spent reached the cap: stop the worker right after the trial just reported."""
    view.note(
        f"budget reached: {format_money(meter.spent(toolkit.clock()))} spent of "
        f"{format_money(record.max_cost)}; stopping after trial {progress.trials_done} "
        "(the search so far is kept)"
    )
    remote = toolkit.connect(record)
    try:
        stop_worker(remote, record.remote_job_dir)
        wait_for_worker_exit(RemoteJobChannel(remote, record.remote_job_dir), toolkit)
    finally:
        remote.close()
    sync_job(record, toolkit)
    record = toolkit.store.save(
        record.model_copy(update={"status": "budget", "message": "budget cap reached"})
    )
    return FollowResult("budget", progress, record)


def worker_log_tail(record: JobRecord, toolkit: Toolkit, *, lines: int = 50) -> str:
    remote = toolkit.connect(record)
    try:
        path = shlex.quote(f"{record.remote_job_dir}/{LOG_FILE}")
        return remote.run(f"tail -n {int(lines)} {path} 2>/dev/null", timeout=60).output
    finally:
        remote.close()


# --- Finishing ------------------------------------------------------------------------------


def pick_trial(
    record: JobRecord, progress: JobProgress, chooser: TrialChooser | None, notify: Notify
) -> ParetoTrial | None:
    front = progress.front()
    if not front:
        return None
    kl_limit = record.kl_limit or 0.5
    automatic = choose_trial(front, kl_limit)
    if record.trial_choice is not None:
        wanted = record.trial_choice
        if wanted not in progress.trials and all(trial.number != wanted for trial in front):
            raise JobError(
                f"Trial {wanted} is not one of this job's trials.",
                f"`hctl results {record.job_id}` lists them.",
            )
        chosen = next((trial for trial in front if trial.number == wanted), None)
        if chosen is None:
            event = progress.trials[wanted]
            chosen = ParetoTrial(
                number=event.number,
                kl=event.kl,
                refusals=event.refusals or 0,
                total_bad=event.total_bad,
                params=event.params,
            )
        return chosen
    if chooser is not None:
        number = chooser(front, automatic)
        if number is not None:
            return next((trial for trial in front if trial.number == number), automatic)
    if automatic is not None:
        notify(
            f"chose trial {automatic.number}: the fewest refusals ({automatic.refusals}/"
            f"{automatic.total_bad}) with KL {automatic.kl:.4f} under the limit {kl_limit}"
            if automatic.kl <= kl_limit
            else f"chose trial {automatic.number}: no trial has KL under {kl_limit}, so the lowest KL"
        )
    return automatic


def export_trial(
    record: JobRecord,
    trial: int,
    toolkit: Toolkit,
    notify: Notify,
    *,
    worker: str,
    token: str | None,
) -> str:
    """Save the trial's model on the machine (and upload it from there); returns its folder."""
    save_dir = f"{record.remote_job_dir}/results/trial-{trial}"
    remote = toolkit.connect(record)
    try:
        command = (
            f"{worker} export --job-dir {shlex.quote(record.remote_job_dir)} --trial {int(trial)} "
            f"--save-directory {shlex.quote(save_dir)}"
        )
        if record.upload_repo:
            command += f" --upload-repo {shlex.quote(record.upload_repo)}"
            upload_secrets(remote, record.remote_job_dir, {"HF_TOKEN": token})
        log = shlex.quote(f"{record.remote_job_dir}/{LOG_FILE}")
        notify(
            f"saving trial {trial} to {save_dir}"
            + (f" and uploading to {record.upload_repo}" if record.upload_repo else "")
        )
        result = remote.run(
            with_secrets(record.remote_job_dir, f"{command} >>{log} 2>&1"),
            timeout=EXPORT_TIMEOUT_S,
        )
        if result.exit_code != 0:
            tail = remote.run(f"tail -n 5 {log}", timeout=30).output.strip()
            raise JobError(
                f"Exporting trial {trial} failed: {tail[-500:]}",
                f"The search results are kept; retry with `hctl attach {record.job_id}` or see "
                f"`hctl logs {record.job_id}`.",
            )
        return save_dir
    finally:
        remote.close()


def download_folder(record: JobRecord, remote_dir: str, local_dir: Path, toolkit: Toolkit) -> int:
    """Copy a folder from the machine; returns the number of files."""
    remote = toolkit.connect(record)
    try:
        listing = remote.run(
            f"cd {shlex.quote(remote_dir)} && find . -type f", timeout=120
        ).output.replace("\r", "")
        names = [line[2:] for line in listing.splitlines() if line.startswith("./")]
        for name in names:
            target = local_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            remote.get(f"{remote_dir}/{name}", target)
        return len(names)
    finally:
        remote.close()


def finish_job(
    record: JobRecord,
    progress: JobProgress,
    toolkit: Toolkit,
    notify: Notify,
    *,
    worker: str,
    token: str | None,
    chooser: TrialChooser | None = None,
) -> JobRecord:
    """Choose, save, upload and download the trial; draw the front."""
    store = toolkit.store
    front = progress.front()
    if not front:
        notify("no scored trials: nothing to choose or save")
        return record
    chosen = pick_trial(record, progress, chooser, notify)
    assert chosen is not None
    save_svg(
        store.picture_path(record.job_id),
        list(progress.trials.values()),
        front,
        title=f"{record.model} — job {record.job_id}",
        chosen=chosen.number,
    )
    record = store.save(record.model_copy(update={"chosen_trial": chosen.number}))
    if record.saved_model_dir is None:
        saved = export_trial(record, chosen.number, toolkit, notify, worker=worker, token=token)
        record = store.save(
            record.model_copy(
                update={
                    "saved_model_dir": saved,
                    "uploaded_repo": record.upload_repo,
                }
            )
        )
        notify(f"saved trial {chosen.number} on the machine: {saved}")
        if record.upload_repo:
            notify(f"uploaded to https://huggingface.co/{record.upload_repo}")
    if record.download_dir and record.downloaded_to is None and record.saved_model_dir:
        local = Path(record.download_dir)
        if record.target == "local" and Path(record.saved_model_dir).resolve() == local.resolve():
            count = 0
        else:
            count = download_folder(record, record.saved_model_dir, local, toolkit)
        record = store.save(record.model_copy(update={"downloaded_to": str(local)}))
        notify(f"downloaded {count} files to {local}")
    return record


# --- The machine after the job ------------------------------------------------------------


def release_machine(record: JobRecord, toolkit: Toolkit, notify: Notify) -> JobRecord:
    """Stop, terminate or keep the pod as the job says, and tell the user which."""
    if record.target != "pod" or record.pod_id is None:
        return record
    provider = toolkit.provider()
    pod_id = record.pod_id
    volume_cost = toolkit.settings.volume_gb * 0.20
    try:
        if record.after == "keep":
            notify(
                f"pod {pod_id} kept running on purpose: it keeps costing "
                f"{format_money(record.price_per_hour)}/h until `hctl stop-pod {pod_id}` or "
                f"`hctl terminate-pod {pod_id}`"
            )
        elif record.after == "terminate":
            provider.terminate(pod_id)
            notify(f"terminated pod {pod_id}: it costs nothing more")
        else:
            provider.stop(pod_id)
            notify(
                f"stopped pod {pod_id}: the GPU no longer bills; its volume costs about "
                f"{format_money(volume_cost)}/month until `hctl terminate-pod {pod_id}`"
            )
    except PodNotFoundError:
        notify(f"pod {pod_id} is already gone")
    return record


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
) -> tuple[Outcome, JobRecord, JobProgress]:
    """Follow a running job to its end, finish it, release its machine.

    Detaching (Ctrl-C) leaves the job and its machine running, on purpose.
    """
    store = toolkit.store
    try:
        result = follow_job(record, toolkit, view, replay=replay)
    except (ConnectionLostError, ConnectError) as error:
        raise JobError(
            error.message,
            f"The job keeps running; `hctl attach {record.job_id}` reconnects. The pod keeps "
            f"billing {format_money(record.price_per_hour)}/h meanwhile.",
        ) from None
    record, progress = result.record, result.progress
    if result.outcome in {"detached", "interrupted"}:
        return result.outcome, record, progress
    try:
        if result.outcome in {"finished", "budget"}:
            record = finish_job(
                record, progress, toolkit, view.note, worker=worker, token=token, chooser=chooser
            )
    finally:
        release_machine(record, toolkit, view.note)
    status = {"finished": "finished", "budget": "budget", "failed": "failed"}[result.outcome]
    record = store.save(record.model_copy(update={"status": status}))
    return result.outcome, record, progress


def cancel_job(record: JobRecord, toolkit: Toolkit, notify: Notify) -> JobRecord:
    """Stop the worker (its results so far are kept) and release the machine."""
    try:
        remote = toolkit.connect(record)
    except HctlError as error:
        notify(f"could not reach the machine ({error.message}); releasing it anyway")
    else:
        try:
            stopped = stop_worker(remote, record.remote_job_dir)
            if stopped:
                wait_for_worker_exit(RemoteJobChannel(remote, record.remote_job_dir), toolkit)
            notify("worker stopped" if stopped else "the worker was not running")
        finally:
            remote.close()
        sync_job(record, toolkit)
    record = toolkit.store.save(record.model_copy(update={"status": "cancelled"}))
    return release_machine(record, toolkit, notify)


def sync_job(record: JobRecord, toolkit: Toolkit) -> bool:
    """Copy any events and journal lines not yet home (once, best effort); False when the
    machine cannot be reached."""
    store = toolkit.store
    _, offset = read_events(store.events_path(record.job_id))
    try:
        follower = Follower(
            channel_factory(record, toolkit),
            offset=offset,
            journal_offset=store.journal_size(record.job_id),
            sleep=toolkit.sleep,
            clock=toolkit.clock,
            give_up_after_s=0,
        )
        try:
            while True:
                poll = follower.poll()
                store.append_journal(record.job_id, poll.journal_raw)
                store.append_events(record.job_id, poll.raw)
                if not poll.raw and not poll.journal_raw:
                    break
        finally:
            follower.close()
    except HctlError:
        return False
    return True


def worker_alive(record: JobRecord, toolkit: Toolkit) -> bool | None:
    """Whether the job's worker runs now; None when its machine cannot be reached."""
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


def resume_job(
    record: JobRecord,
    toolkit: Toolkit,
    notify: Notify,
    *,
    n_trials: int | None = None,
    gpu: str | None = None,
    pod: str | None = None,
    confirm: Callable[[str], None] | None = None,
) -> JobRecord:
    """Run the worker again on the job's journal: trials already done are not redone.

    On its pod when that still exists (started again if stopped), else on a new pod (or the
    one given) where the journal and events copied home are uploaded into a fresh job directory.
    """
    store = toolkit.store
    if (
        record.target == "pod"
        and pod is None
        and record.pod_id is not None
        and _pod_usable(record, toolkit)
        and worker_alive(record, toolkit)
    ):
        raise JobError(
            f"Job {record.job_id} is still running.",
            f"Follow it with `hctl attach {record.job_id}`.",
        )
    progress = local_progress(record, toolkit)
    total = n_trials if n_trials is not None else record.n_trials
    if total < 1:
        raise JobError("--trials must be at least 1.", "Give the total number of trials.")
    settings_values = dict(record.worker_settings)
    settings_values["n_trials"] = total
    updates: dict = {"n_trials": total, "worker_settings": settings_values, "status": "preparing"}
    if record.target == "pod":
        meter = meter_for(record, toolkit)
        last_seen = max(
            (event.ts for event in store.events(record.job_id) if hasattr(event, "ts")),
            default=meter.started_at,
        )
        spent = meter.spent(last_seen) if record.started_at is not None else record.spent_before
        updates |= {"spent_before": spent, "saved_model_dir": None, "downloaded_to": None}
    record = store.save(record.model_copy(update=updates))
    if record.target == "pod":
        record = _resume_machine(record, toolkit, notify, gpu=gpu, pod=pod, confirm=confirm)
    else:
        record = store.save(record.model_copy(update={"started_at": toolkit.clock()}))
    notify(f"resuming job {record.job_id}: {progress.trials_done} trials done, {total} wanted")
    remote = toolkit.connect(record)
    try:
        from hctl.services.launch import start_worker

        return start_worker(
            record,
            settings_values,
            remote,
            toolkit,
            notify,
            token=hf_token(toolkit),
            resume_files={
                JOURNAL_FILE: store.journal_path(record.job_id),
                EVENTS_FILE: store.events_path(record.job_id),
            },
        )
    except BaseException:
        if record.pod_created_here and record.target == "pod" and record.pod_id:
            release_after_failure(
                toolkit.provider(), record.pod_id, created_here=True, started_here=False,
                notify=notify,
            )  # fmt: skip
        raise
    finally:
        remote.close()


def _pod_usable(record: JobRecord, toolkit: Toolkit) -> bool:
    try:
        pod = toolkit.provider().get(record.pod_id or "")
    except PodNotFoundError:
        return False
    return pod.status not in {"TERMINATED", "DEAD"}


def _resume_machine(
    record: JobRecord,
    toolkit: Toolkit,
    notify: Notify,
    *,
    gpu: str | None,
    pod: str | None,
    confirm: Callable[[str], None] | None,
) -> JobRecord:
    """The pod to continue on: the job's own if it still exists, the given one, or a new one."""
    from hctl.services.launch import RunRequest, bring_up_pod, plan_run, remote_base_dir

    reuse_own = pod is None and gpu is None and _pod_usable(record, toolkit)
    if reuse_own:
        pod = record.pod_id
        notify(f"pod {pod} still exists: continuing there")
    request = RunRequest(
        model=record.model,
        n_trials=max(1, record.n_trials - len(local_progress(record, toolkit).trials)),
        gpu=gpu or record.gpu_id,
        pod=pod,
        params=str(record.parameters) if record.parameters else None,
        after=record.after,
    )
    plan = plan_run(request, toolkit)
    plan.worker_settings = record.worker_settings
    if confirm is not None and plan.creates_pod:
        confirm(
            f"Create a new {plan.estimate.gpu_name} pod to finish job {record.job_id} for about "
            f"{format_money(plan.estimate.total_cost)}?"
        )
    record = toolkit.store.save(
        record.model_copy(
            update={"pod_id": None if plan.creates_pod else plan.pod.id if plan.pod else None,
                    "pod_created_here": plan.creates_pod or (reuse_own and record.pod_created_here),
                    "gpu_id": plan.gpu.id if plan.gpu else record.gpu_id}
        )
    )  # fmt: skip
    record = bring_up_pod(plan, record, toolkit, notify)
    if plan.creates_pod:
        record = toolkit.store.save(record.model_copy(update={"pod_created_here": True}))
    remote = toolkit.connect(record)
    try:
        job_dir = f"{remote_base_dir('pod', remote, toolkit)}/jobs/{record.job_id}"
    finally:
        remote.close()
    return toolkit.store.save(record.model_copy(update={"remote_job_dir": job_dir}))


__all__ = ["EVENTS_FILE", "complete", "cancel_job", "follow_job", "resume_job", "sync_job"]
