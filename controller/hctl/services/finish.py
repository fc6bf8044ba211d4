"""Finishing a job: choose a trial of the Pareto front, save it on the machine (and upload it
from there), download it, draw the front; then stop, terminate or keep the pod, and say which.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

from hctl.errors import ConfigError, HctlError, JobError, PodNotFoundError
from hctl.interrupts import releasing
from hctl.services.estimate import format_money
from hctl.services.job_protocol import FINISHING_FILE, with_secrets
from hctl.services.jobs import JobRecord
from hctl.services.pareto_plot import save_svg
from hctl.services.planning import Notify
from hctl.services.progress import JobProgress
from hctl.services.request import check_download_folder
from hctl.services.toolkit import Toolkit
from hctl.services.uploads import upload_secrets
from hctl_worker.events import LOG_FILE
from hctl_worker.trials import DEFAULT_KL_LIMIT, Trial, choose, find

# Ask the user to pick a trial of the front; None means "let hctl choose".
TrialChooser = Callable[[list[Trial], Trial | None], int | None]

EXPORT_TIMEOUT_S = 3 * 3600


def pick_trial(
    record: JobRecord, progress: JobProgress, chooser: TrialChooser | None, notify: Notify
) -> Trial | None:
    front = progress.front()
    if not front:
        return None
    kl_limit = record.kl_limit or DEFAULT_KL_LIMIT
    automatic = choose(front, kl_limit)
    if record.trial_choice is not None:
        wanted = record.trial_choice
        chosen = find(front, wanted) or progress.trials.get(wanted)
        if chosen is None:
            raise JobError(
                f"There is no finished trial {wanted} in job {record.job_id} "
                f"({progress.trials_done} trials finished).",
                f"`hctl results {record.job_id}` lists them; `hctl attach {record.job_id} "
                "--trial K` saves one of those.",
            )
        return chosen
    while chooser is not None:
        number = chooser(front, automatic)
        if number is None:
            break
        answer = find(front, number) or progress.trials.get(number)
        if answer is not None:
            return answer
        # Asked again: a typo must not save another trial than the one the user named.
        notify(
            f"there is no finished trial {number}: the front holds "
            f"{', '.join(str(trial.number) for trial in front)} (any finished trial may be saved)"
        )
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
        finishing = shlex.quote(f"{record.remote_job_dir}/{FINISHING_FILE}")
        result = remote.run(
            with_secrets(
                record.remote_job_dir,
                f"touch {finishing}; {command} >>{log} 2>&1; status=$?; rm -f {finishing}; "
                "exit $status",
            ),
            timeout=EXPORT_TIMEOUT_S,
        )
        if result.exit_code != 0:
            tail = remote.run(f"tail -n 5 {log}", timeout=30).output.strip()
            raise JobError(
                f"Exporting trial {trial} failed: {tail[-500:]}",
                f"The search results are kept; see `hctl logs {record.job_id}`, then retry with "
                f"`hctl attach {record.job_id}`"
                + (f" after `hctl start-pod {record.pod_id}`." if record.pod_id else "."),
            )
        return save_dir
    finally:
        remote.close()


def download_folder(record: JobRecord, remote_dir: str, local_dir: Path, toolkit: Toolkit) -> int:
    """Copy a folder from the machine into a new or empty `local_dir`; returns the number of files.

    The folder was checked before the job started; it is checked again, since the search took a
    while: nothing of the user's is overwritten.
    """
    try:
        check_download_folder(local_dir)
    except ConfigError as error:
        raise JobError(
            f"Not downloading: {error.message}",
            f"The model stays on the machine ({remote_dir}); `hctl attach {record.job_id}` "
            "downloads it once the folder is empty or gone.",
        ) from None
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
    except OSError as error:
        raise JobError(
            f"Downloading to {local_dir} failed: {error.strerror or error}.",
            f"The model stays on the machine ({remote_dir}); free the folder, then "
            f"`hctl attach {record.job_id}` downloads it.",
        ) from None
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


def unsaved_note(record: JobRecord) -> str:
    """What to do after a Ctrl-C while the trial was chosen or saved (its pods released)."""
    start = (
        f"`hctl start-pod {record.pod_id}`, then "
        if record.target == "pod" and record.after != "keep" and not record.unreleased_pods
        else ""
    )
    return (
        f"the search is done and kept; no trial was saved: {start}`hctl attach {record.job_id}` "
        "chooses and saves one"
    )


def next_steps(record: JobRecord) -> list[tuple[str, str]]:
    """What a user can do with a finished job's model: (command to type, what it does)."""
    job = record.job_id
    steps = [(f"hctl results {job}", "the Pareto front, the chosen trial and where the model is")]
    saved, trial = record.saved_model_dir, record.chosen_trial
    if saved is None or trial is None:
        return steps
    here = record.downloaded_to or (saved if record.target == "local" else None)
    worker = "hctl-worker" if record.target == "local" else record.worker_command
    export = (
        f"{worker} export --job-dir {shlex.quote(record.remote_job_dir)} --trial {trial} "
        "--upload-repo USER/NAME"
    )
    if here is not None:
        steps.append((f"hctl-worker chat {shlex.quote(here)}", "talk to it (needs hctl[worker])"))
    if record.target == "local":
        if not record.uploaded_repo:
            steps.append((export, "upload it to the Hugging Face hub (HF_TOKEN set)"))
        return steps
    if record.target == "pod" and record.after == "terminate":
        return steps  # the pod and its volume are gone; only what was downloaded or uploaded stays
    machine = record.pod_id if record.target == "pod" else record.address
    if record.target == "pod" and record.after != "keep" and not record.unreleased_pods:
        steps.append(
            (f"hctl start-pod {machine} --wait", "start the pod again (its volume kept it)")
        )
    steps.append((f"hctl connect {machine}", "a shell there, then:"))
    steps.append((f"{worker} chat {shlex.quote(saved)}", "talk to it on the machine"))
    if not record.uploaded_repo:
        steps.append((export, "upload it from the machine (HF_TOKEN set there)"))
    return steps


# --- The machine after the job ------------------------------------------------------------


def release_machine(record: JobRecord, toolkit: Toolkit, notify: Notify) -> JobRecord:
    """Stop, terminate or keep the pod as the job says, and tell the user which.

    A pod the provider would not stop or terminate (its API failing after every retry) is named
    with what it costs and what to type, and listed in `unreleased_pods`; nothing is raised, so
    the job's results are still shown and the other pods of the job are still released.
    """
    if record.target != "pod" or record.pod_id is None:
        return record
    provider = toolkit.provider()
    pod_id = record.pod_id
    volume_cost = toolkit.settings.volume_gb * 0.20
    if record.after == "keep":
        notify(
            f"pod {pod_id} kept running on purpose: it keeps costing "
            f"{format_money(record.price_per_hour)}/h until `hctl stop-pod {pod_id}` or "
            f"`hctl terminate-pod {pod_id}`"
        )
        return record
    verb = "terminate" if record.after == "terminate" else "stop"

    doing = "terminating" if verb == "terminate" else "stopping"
    still = f"still {doing} pod {pod_id}; Ctrl-C again leaves it running"
    try:
        with releasing(pod_id, verb, notify, still):
            if record.after == "terminate":
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
    except HctlError as error:
        notify(
            f"could not {verb} pod {pod_id} ({error.message}): it is still running and billing "
            f"{format_money(record.price_per_hour)}/h — run `hctl {verb}-pod {pod_id}`"
        )
        return record.model_copy(update={"unreleased_pods": [*record.unreleased_pods, pod_id]})
    return record


def unreleased_error(record: JobRecord) -> JobError:
    """The error a command ends with when the job's end left pods billing."""
    pods = ", ".join(record.unreleased_pods)
    verb = "terminate" if record.after == "terminate" else "stop"
    commands = " and ".join(f"`hctl {verb}-pod {pod_id}`" for pod_id in record.unreleased_pods)
    return JobError(
        f"Job {record.job_id}'s pod{'s' if len(record.unreleased_pods) > 1 else ''} {pods} could "
        f"not be {'terminated' if verb == 'terminate' else 'stopped'}: still running and billing.",
        f"Run {commands} (`hctl list-pods` shows what runs).",
    )
