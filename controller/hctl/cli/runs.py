"""Commands that run jobs: `run`, `estimate`, `attach`, `cancel`, `resume`, `test`.

Each parses its options, calls `hctl.services`, and renders; the commands that only show jobs
(`jobs`, `results`, `logs`) are in `hctl.cli.jobs`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomli_w
import typer

from hctl.cli.common import asking, confirm
from hctl.cli.jobs import JOB_HELP, load_job, machine, show_results, toolkit
from hctl.errors import ConfigError, JobError
from hctl.output import HctlCommand, console, json_option, print_json, print_line, print_table
from hctl.services import fleet_launch, launch, lease, runs, sync
from hctl.services import resume as resume_service
from hctl.services.budget import check_estimate_within
from hctl.services.estimate import compare_gpus, format_money
from hctl.services.finish import unreleased_error
from hctl.services.jobs import JobRecord
from hctl.services.models import ModelInfo, format_parameter_count, inspect_model
from hctl.services.request import RunRequest, parse_assignments
from hctl.services.toolkit import Toolkit
from hctl.services.view import (
    ESTIMATE_COLUMNS,
    LiveView,
    estimate_data,
    estimate_rows,
    pareto_columns,
    pareto_rows,
    phases_line,
)

SMOKE_MODEL = "Qwen/Qwen3-4B-Instruct-2507"
SMOKE_PARAMETERS = "4.02B"


def _chooser(assume_yes: bool, view: LiveView) -> runs.TrialChooser | None:
    """Ask which trial to save when a person is there to answer; else hctl chooses."""
    if assume_yes or not sys.stdin.isatty():
        return None

    def choose(front: list, suggested: object) -> int | None:
        view.pause()  # the live panel would redraw over the question
        default = getattr(suggested, "number", None)
        print_table(pareto_columns(front), pareto_rows(front, chosen=default), title="Pareto front")
        with asking():
            return typer.prompt("Trial to save", default=default, type=int)

    return choose


def _follow(
    record: JobRecord, toolkit: Toolkit, *, assume_yes: bool, replay: bool, restarted: bool = False
) -> None:
    """Follow a running job to its end and show the results (or how to reattach)."""
    with LiveView(console, job_id=record.job_id, machine=machine(record)) as view:
        outcome, record, progress = runs.complete(
            record, toolkit, view, worker=record.worker_command, token=launch.hf_token(toolkit),
            chooser=_chooser(assume_yes, view), replay=replay, restarted=restarted,
        )  # fmt: skip
    job = record.job_id
    if outcome == "detached":
        print_line(
            f"Detached; job {job} keeps running on {machine(record)}. "
            f"Reattach with `hctl attach {job}`, stop it with `hctl cancel {job}`."
        )
        if record.target == "pod":
            print_line(_billing_while_detached(record, toolkit))
        return
    if outcome == "interrupted":
        raise JobError(
            f"Job {job} stopped mid-search: {record.message}",
            f"`hctl results {job}` shows the trials so far; `hctl resume {job}` continues once "
            "the database's pod can start again."
            if record.members
            else f"Its journal and events are on this computer: `hctl resume {job}` continues on "
            "a new pod without redoing any trial.",
        )
    show_results(record, progress, toolkit, status_line=outcome != "failed")
    if record.unreleased_pods:
        raise unreleased_error(record)
    if outcome == "failed":
        raise JobError(
            f"Job {job} failed: {record.message or 'see its log'}",
            f"`hctl logs {job}` shows the worker's log; `hctl resume {job}` retries from the "
            "trials already done.",
        )


def _billing_while_detached(record: JobRecord, toolkit: Toolkit) -> str:
    """What a detached job's pods cost from now on, and when that ends by itself."""
    pods, one = machine(record).capitalize(), not record.members
    billing = f"{pods} keep{'s' if one else ''} billing {format_money(record.price_per_hour)}/h"
    if record.after == "keep":
        stop = f"`hctl stop-pod {record.pod_id if one else 'POD'}`"
        return f"{billing} until you stop {'it' if one else 'each'} ({stop}): it was kept (--keep)."
    minutes = max(1, round(toolkit.settings.self_stop_grace_s / 60))
    return (
        f"{billing} while the job runs, and stop{'s' if one else ''} by "
        f"{'itself' if one else 'themselves'} about {minutes} min after it ends; "
        f"`hctl attach {record.job_id}` saves the result and stops {'it' if one else 'them'} "
        f"sooner, `hctl cancel {record.job_id}` now."
    )


def _describe_model(model: ModelInfo) -> None:
    size = (
        f"{format_parameter_count(model.parameters)} parameters"
        if model.parameters
        else "size unknown"
    )
    print_line(f"Model {model.reference}: {size} (from {model.source})")


def _show_plan(plan: launch.RunPlan, kit: Toolkit) -> None:
    _describe_model(plan.model)
    title = f"Estimate for {plan.n_trials} trials"
    print_table(ESTIMATE_COLUMNS, estimate_rows([plan.estimate]), title=title)
    print_line(f"Phases: {phases_line(plan.estimate)}")
    if plan.estimate.basis:
        print_line(f"Durations {plan.estimate.basis}.")
    if plan.team.note:
        print_line(f"Workers: {plan.team.note}.")
    if plan.fleet is not None:
        print_line(f"Database: {plan.fleet.note}.")
    elif plan.team.workers > 1:
        print_line(f"Workers: {plan.team.workers} share one search.")
    if plan.creates_pod:
        print_line(lease.plan_text(kit.provider(), plan.estimate.total_seconds))


def run(
    model: str = typer.Argument(..., help="Hugging Face repo id or local model folder."),
    gpu: str | None = typer.Option(None, "--gpu", help="GPU type (id or name) for a new pod."),
    spot: bool = typer.Option(False, "--spot", help="Rent a spot (interruptible) pod."),
    trials: int | None = typer.Option(
        None, "--trials", help="Number of trials (default: n_trials of the settings, 200)."
    ),
    pod: str | None = typer.Option(None, "--pod", help="Run on this existing pod (id or name)."),
    on: str | None = typer.Option(None, "--on", help="local, or ssh://USER@HOST:PORT."),
    gpus: int | None = typer.Option(
        None, "--gpus", help="GPUs of the new pod; one worker each, one search (default 1)."
    ),
    pods: int | None = typer.Option(
        None, "--pods", help="New pods sharing one search, its study in PostgreSQL on the first."
    ),
    workers: int | None = typer.Option(
        None, "--workers", help="--on: workers sharing one search on that machine (default 1)."
    ),
    config: Path | None = typer.Option(None, "--config", help="Worker settings file (TOML)."),
    trial: int | None = typer.Option(
        None, "--trial", help="Save trial number K, as trial lines show it (default: ask/best)."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask; choose the trial headless."),
    download: Path | None = typer.Option(None, "--download", help="Copy the model here."),
    max_cost: float | None = typer.Option(None, "--max-cost", help="Budget in USD for this job."),
    keep: bool = typer.Option(False, "--keep", help="Keep the pod running afterwards."),
    terminate: bool = typer.Option(False, "--terminate", help="Terminate the pod afterwards."),
    upload: str | None = typer.Option(None, "--upload", help="Upload the model to USER/NAME."),
    params: str | None = typer.Option(None, "--params", help="Model size if unknown, e.g. 4B."),
    image: str | None = typer.Option(None, "--image", help="Container image for a new pod."),
    job_dir: str | None = typer.Option(
        None, "--output", "--job-dir", help="--on local: the job folder (results go under it)."
    ),
    assignments: list[str] | None = typer.Option(
        None, "--set", help="Worker setting KEY=VALUE (repeatable), e.g. --set batch_size=8."
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Check everything, show the estimate and the worker's settings; start nothing.",
    ),
) -> None:
    """Estimate, rent (or reuse) a machine, run the search there, follow it live, save the result,
    and stop the pod."""
    if keep and terminate:
        raise ConfigError("--keep and --terminate contradict each other.", "Give one of them.")
    kit = toolkit()
    request = RunRequest(
        model=model, n_trials=trials, gpu=gpu, spot=spot, pod=pod, on=on, config_file=config,
        worker_overrides=parse_assignments(assignments or []), trial=trial,
        download=download, max_cost=max_cost, upload=upload, params=params, image=image,
        after="keep" if keep else ("terminate" if terminate else None), job_dir=job_dir,
        gpus=gpus, workers=workers, pods=pods,
    )  # fmt: skip
    plan = launch.plan_run(request, kit)
    _show_plan(plan, kit)
    check_estimate_within(
        plan.estimate, max_cost if max_cost is not None else kit.settings.max_cost
    )
    if dry_run:
        print_line("The worker's settings (command line > HERETIC_* > --config file > defaults):")
        console.out(tomli_w.dumps(plan.worker_settings), end="", highlight=False)
        print_line("Dry run: nothing was started or rented.")
        return
    if plan.target == "pod":
        confirm(f"Run this job for about {format_money(plan.estimate.total_cost)}?", assume_yes=yes)
    start = fleet_launch.start_fleet if plan.fleet is not None else launch.start_job
    _follow(start(plan, kit, print_line), kit, assume_yes=yes, replay=False)


def estimate(
    model: str = typer.Argument(..., help="Hugging Face repo id or local model folder."),
    gpu: list[str] | None = typer.Option(None, "--gpu", help="GPU to compare (repeatable)."),
    trials: int = typer.Option(200, "--trials", min=1, help="Number of trials of the search."),
    params: str | None = typer.Option(None, "--params", help="Model size if unknown, e.g. 4B."),
    spot: bool = typer.Option(False, "--spot", help="Spot prices."),
    response_tokens: int = typer.Option(
        100, "--response-tokens", min=1, help="max_response_length."
    ),
    as_json: bool = json_option(),
) -> None:
    """Estimate a job's duration and total cost on several GPUs side by side; creates nothing."""
    kit = toolkit()
    info = inspect_model(model, parameters_override=params, token=launch.hf_token(kit))
    estimates = compare_gpus(
        info, kit.provider().gpu_types(), n_trials=trials, wanted=gpu, spot=spot,
        cloud_type=kit.settings.cloud_type, response_tokens=response_tokens,
        volume_gb=kit.settings.volume_gb,
    )  # fmt: skip
    if as_json:
        print_json(
            {
                "model": info.model_dump(mode="json"),
                "estimates": [estimate_data(e) for e in estimates],
            }
        )
        return
    _describe_model(info)
    print_table(ESTIMATE_COLUMNS, estimate_rows(estimates), title=f"Estimates for {trials} trials")
    if estimates:
        print_line(f"Phases on {estimates[0].gpu_name}: {phases_line(estimates[0])}")
    print_line("A planning figure from a simple throughput model, not a bill.", style="dim")


def attach(
    job: str = typer.Argument(..., help=JOB_HELP),
    trial: int | None = typer.Option(None, "--trial", min=1, help="Save trial K instead."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Choose the trial headless."),
) -> None:
    """Follow a job again: its events so far, then live to the end (then save and stop the pod)."""
    kit = toolkit()
    record = load_job(kit, job)
    if not record.remote_job_dir:
        raise JobError(
            f"Job {record.job_id} never started ({record.status}: {record.message}).",
            "Start a new one with `hctl run`.",
        )
    if trial is not None and trial != record.trial_choice:
        record = kit.store.save(
            record.model_copy(update={"trial_choice": trial, "chosen_trial": None,
                                      "saved_model_dir": None, "downloaded_to": None})
        )  # fmt: skip
    if record.status in {"finished", "cancelled", "budget"} and trial is None:
        show_results(record, sync.local_progress(record, kit), kit)
        return
    _follow(record, kit, assume_yes=yes, replay=True)


def cancel(
    job: str = typer.Argument(..., help=JOB_HELP),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
) -> None:
    """Stop a job's worker (results so far are kept) and stop, terminate or keep its pod."""
    kit = toolkit()
    record = load_job(kit, job)
    if record.status in {"finished", "budget", "cancelled"}:
        # Nothing runs: its worker ended and its pods were released (or kept) at its end.
        print_line(
            f"Job {record.job_id} is {record.status} already: nothing to cancel "
            f"(`hctl results {record.job_id}` shows it)."
        )
        if record.unreleased_pods:
            raise unreleased_error(record)
        return
    confirm(f"Stop job {record.job_id} on {machine(record)}?", assume_yes=yes)
    record = runs.cancel_job(record, kit, print_line)
    if record.unreleased_pods:
        raise unreleased_error(record)


def resume(
    job: str = typer.Argument(..., help=JOB_HELP),
    trials: int | None = typer.Option(None, "--trials", min=1, help="Raise the number of trials."),
    gpu: str | None = typer.Option(None, "--gpu", help="GPU type for the new pod."),
    pod: str | None = typer.Option(None, "--pod", help="Continue on this existing pod."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
) -> None:
    """Continue a job from its journal: on its pod if it still exists, else on a new pod."""
    kit = toolkit()
    record = load_job(kit, job)
    record = resume_service.resume_job(
        record, kit, print_line, n_trials=trials, gpu=gpu, pod=pod,
        confirm=lambda question: confirm(question, assume_yes=yes),
    )  # fmt: skip
    _follow(record, kit, assume_yes=yes, replay=False, restarted=True)


def smoke_test(
    gpu: str | None = typer.Option(None, "--gpu", help="GPU type for the pod."),
    trials: int = typer.Option(10, "--trials", help="Number of trials."),
    on: str | None = typer.Option(None, "--on", help="local, or ssh://USER@HOST:PORT."),
    pod: str | None = typer.Option(None, "--pod", help="An existing pod."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
) -> None:
    """The owner's smoke run: Qwen/Qwen3-4B-Instruct-2507 with a few trials, pod stopped after."""
    run(
        model=SMOKE_MODEL, gpu=gpu, spot=False, trials=trials, pod=pod, on=on, config=None,
        trial=None, yes=yes, download=None, max_cost=None, keep=False, terminate=False,
        upload=None, params=SMOKE_PARAMETERS, image=None, job_dir=None, assignments=None,
        dry_run=False, gpus=None, workers=None, pods=None,
    )  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `hctl` application."""
    app.command("run", cls=HctlCommand)(run)
    app.command("estimate", cls=HctlCommand)(estimate)
    app.command("attach", cls=HctlCommand)(attach)
    app.command("cancel", cls=HctlCommand)(cancel)
    app.command("resume", cls=HctlCommand)(resume)
    app.command("test", cls=HctlCommand)(smoke_test)
