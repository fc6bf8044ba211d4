"""Commands for jobs: `run`, `estimate`, `jobs`, `attach`, `logs`, `results`, `cancel`, `resume`,
`test`. Each parses its options, calls `hctl.services`, and renders."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from hctl.cli.common import confirm, console, error_console
from hctl.errors import ConfigError, JobError
from hctl.services import billing, launch, lease, runs
from hctl.services import resume as resume_service
from hctl.services.budget import check_estimate_within
from hctl.services.estimate import compare_gpus, format_money
from hctl.services.jobs import JobRecord
from hctl.services.models import format_parameter_count, inspect_model
from hctl.services.progress import JobProgress
from hctl.services.toolkit import Toolkit, default_toolkit
from hctl.services.view import LiveView, estimate_table, pareto_table, phases_line
from hctl.settings import load_settings

SMOKE_MODEL = "Qwen/Qwen3-4B-Instruct-2507"
SMOKE_PARAMETERS = "4.02B"


def _toolkit(**overrides: object) -> Toolkit:
    return default_toolkit(load_settings(**overrides))


def _machine(record: JobRecord) -> str:
    if record.target == "pod":
        return f"pod {record.pod_id}"
    return record.address or "this machine"


def _chooser(assume_yes: bool, view: LiveView) -> runs.TrialChooser | None:
    """Ask which trial to save when a person is there to answer; else hctl chooses."""
    if assume_yes or not sys.stdin.isatty():
        return None

    def choose(front: list, suggested: object) -> int | None:
        view.pause()  # the live panel would redraw over the question
        console.print(pareto_table(front, chosen=getattr(suggested, "number", None)))
        default = getattr(suggested, "number", None)
        return typer.prompt("Trial to save", default=default, type=int)

    return choose


def _follow(
    record: JobRecord,
    toolkit: Toolkit,
    *,
    assume_yes: bool,
    replay: bool,
    restarted: bool = False,
) -> None:
    """Follow a running job to its end and show the results (or how to reattach)."""
    with LiveView(console, job_id=record.job_id, machine=_machine(record)) as view:
        outcome, record, progress = runs.complete(
            record,
            toolkit,
            view,
            worker=record.worker_command,
            token=launch.hf_token(toolkit),
            chooser=_chooser(assume_yes, view),
            replay=replay,
            restarted=restarted,
        )
    if outcome == "detached":
        console.print(
            f"Detached; job {record.job_id} keeps running on {_machine(record)}. "
            f"Reattach with `hctl attach {record.job_id}`, stop it with `hctl cancel {record.job_id}`."
        )
        if record.target == "pod":
            console.print(
                f"Pod {record.pod_id} keeps billing {format_money(record.price_per_hour)}/h until "
                "the job is followed to its end (or cancelled)."
            )
        return
    if outcome == "interrupted":
        raise JobError(
            f"Job {record.job_id} stopped mid-search: {record.message}",
            f"Its journal and events are on this computer: `hctl resume {record.job_id}` "
            "continues on a new pod without redoing any trial.",
        )
    _show_results(record, progress, toolkit, status_line=outcome != "failed")
    if outcome == "failed":
        raise JobError(
            f"Job {record.job_id} failed: {record.message or 'see its log'}",
            f"`hctl logs {record.job_id}` shows the worker's log; `hctl resume {record.job_id}` "
            "retries from the trials already done.",
        )


def _show_results(
    record: JobRecord, progress: JobProgress, toolkit: Toolkit, *, status_line: bool = True
) -> None:
    front = progress.front()
    if front:
        console.print(pareto_table(front, chosen=record.chosen_trial))
    picture = toolkit.store.picture_path(record.job_id)
    if picture.is_file():
        console.print(f"Pareto plot: {picture}")
    if record.saved_model_dir:
        console.print(f"Saved model (on {_machine(record)}): {record.saved_model_dir}")
    if record.downloaded_to:
        console.print(f"Downloaded to: {record.downloaded_to}")
    if status_line:
        console.print(f"Job {record.job_id}: {record.status}. {record.message}".rstrip())


def run(
    model: str = typer.Argument(..., help="Hugging Face repo id or local model folder."),
    gpu: str | None = typer.Option(None, "--gpu", help="GPU type (id or name) for a new pod."),
    spot: bool = typer.Option(False, "--spot", help="Rent a spot (interruptible) pod."),
    trials: int = typer.Option(200, "--trials", help="Number of trials of the search."),
    pod: str | None = typer.Option(None, "--pod", help="Run on this existing pod (id or name)."),
    on: str | None = typer.Option(None, "--on", help="local, or ssh://USER@HOST:PORT."),
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
    job_dir: str | None = typer.Option(None, "--job-dir", help="--on local: job directory."),
    assignments: list[str] | None = typer.Option(
        None, "--set", help="Worker setting KEY=VALUE (repeatable), e.g. --set batch_size=8."
    ),
) -> None:
    """Estimate, rent (or reuse) a machine, run the search there, follow it live, save the result,
    and stop the pod."""
    if keep and terminate:
        raise ConfigError("--keep and --terminate contradict each other.", "Give one of them.")
    toolkit = _toolkit()
    request = launch.RunRequest(
        model=model, n_trials=trials, gpu=gpu, spot=spot, pod=pod, on=on, config_file=config,
        worker_overrides=launch.parse_assignments(assignments or []), trial=trial,
        download=download, max_cost=max_cost, upload=upload, params=params, image=image,
        after="keep" if keep else ("terminate" if terminate else None), job_dir=job_dir,
    )  # fmt: skip
    plan = launch.plan_run(request, toolkit)
    _show_plan(plan, toolkit)
    check_estimate_within(
        plan.estimate, max_cost if max_cost is not None else toolkit.settings.max_cost
    )
    if plan.target == "pod":
        confirm(f"Run this job for about {format_money(plan.estimate.total_cost)}?", assume_yes=yes)
    record = launch.start_job(plan, toolkit, lambda message: console.print(message, markup=False))
    _follow(record, toolkit, assume_yes=yes, replay=False)


def _show_plan(plan: launch.RunPlan, toolkit: Toolkit) -> None:
    model = plan.model
    size = (
        f"{format_parameter_count(model.parameters)} parameters"
        if model.parameters
        else "size unknown"
    )
    console.print(f"Model {model.reference}: {size} (from {model.source})")
    console.print(
        estimate_table([plan.estimate], title=f"Estimate for {plan.request.n_trials} trials")
    )
    console.print(f"Phases: {phases_line(plan.estimate)}")
    if plan.creates_pod:
        console.print(lease.plan_text(toolkit.provider(), plan.estimate.total_seconds))


def estimate(
    model: str = typer.Argument(..., help="Hugging Face repo id or local model folder."),
    gpu: list[str] | None = typer.Option(None, "--gpu", help="GPU to compare (repeatable)."),
    trials: int = typer.Option(200, "--trials", help="Number of trials of the search."),
    params: str | None = typer.Option(None, "--params", help="Model size if unknown, e.g. 4B."),
    spot: bool = typer.Option(False, "--spot", help="Spot prices."),
    response_tokens: int = typer.Option(100, "--response-tokens", help="max_response_length."),
) -> None:
    """Estimate a job's duration and total cost on several GPUs side by side; creates nothing."""
    toolkit = _toolkit()
    info = inspect_model(model, parameters_override=params, token=launch.hf_token(toolkit))
    estimates = compare_gpus(
        info, toolkit.provider().gpu_types(), n_trials=trials, wanted=gpu, spot=spot,
        cloud_type=toolkit.settings.cloud_type, response_tokens=response_tokens,
        volume_gb=toolkit.settings.volume_gb,
    )  # fmt: skip
    size = (
        f"{format_parameter_count(info.parameters)} parameters"
        if info.parameters
        else "size unknown"
    )
    console.print(f"Model {info.reference}: {size} (from {info.source})")
    console.print(estimate_table(estimates, title=f"Estimates for {trials} trials"))
    if estimates:
        console.print(f"Phases on {estimates[0].gpu_name}: {phases_line(estimates[0])}")
    console.print("A planning figure from a simple throughput model, not a bill.", style="dim")


def jobs(
    pod: str | None = typer.Argument(None, help="Only the jobs of this pod."),
) -> None:
    """List the jobs on this computer: where they run, how far they got, what they cost."""
    from rich.table import Table

    toolkit = _toolkit()
    table = Table()
    for column in ("job", "model", "machine", "status", "trials", "best", "price", "cost"):
        table.add_column(column, no_wrap=column in {"job", "status", "trials"}, overflow="fold")
    records = [record for record in toolkit.store.list() if pod in (None, record.pod_id)]
    bills = billing.billed_by_job(records, toolkit.provider)
    for record in records:
        progress = runs.local_progress(record, toolkit)
        best = progress.best(record.kl_limit or 0.5)
        table.add_row(
            record.job_id, record.model, _machine(record), record.status,
            f"{progress.trials_done}/{progress.n_trials or record.n_trials}",
            f"#{best.number} {best.refusals}/{best.total_bad} KL {best.kl:.3f}" if best else "—",
            f"{format_money(record.price_per_hour)}/h" if record.target == "pod" else "—",
            billing.bill_text(record, bills.get(record.job_id)),
        )  # fmt: skip
    console.print(table)


def attach(
    job: str = typer.Argument(..., help="The job id (`hctl jobs` lists them)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Choose the trial headless."),
) -> None:
    """Follow a job again: its events so far, then live to the end (then save and stop the pod)."""
    toolkit = _toolkit()
    record = toolkit.store.load(job)
    if not record.remote_job_dir:
        raise JobError(
            f"Job {record.job_id} never started ({record.status}: {record.message}).",
            "Start a new one with `hctl run`.",
        )
    if record.status in {"finished", "cancelled", "budget"}:
        _show_results(record, runs.local_progress(record, toolkit), toolkit)
        return
    _follow(record, toolkit, assume_yes=yes, replay=True)


def logs(
    job: str = typer.Argument(..., help="The job id."),
    lines: int = typer.Option(50, "--lines", "-n", help="How many lines from the end."),
) -> None:
    """Show the end of the worker's log on the job's machine."""
    toolkit = _toolkit()
    record = toolkit.store.load(job)
    typer.echo(runs.worker_log_tail(record, toolkit, lines=lines), nl=False)


def results(job: str = typer.Argument(..., help="The job id.")) -> None:
    """The job's Pareto front, chosen trial and saved model (fresh from its machine if reachable)."""
    toolkit = _toolkit()
    record = toolkit.store.load(job)
    if record.status == "running" and not runs.sync_job(record, toolkit):
        error_console.print("(machine not reachable: showing the copy on this computer)")
    progress = runs.local_progress(record, toolkit)
    state = "finished" if progress.done else ("failed" if progress.error else progress.stage)
    console.print(f"{progress.trials_done}/{progress.n_trials} trials; search {state}.")
    _show_results(record, progress, toolkit)
    bill = billing.billed_by_job([record], toolkit.provider).get(record.job_id)
    if bill is not None or record.estimated_cost is not None:
        console.print(f"Cost of its pods: {billing.bill_text(record, bill)}.")


def cancel(
    job: str = typer.Argument(..., help="The job id."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
) -> None:
    """Stop a job's worker (results so far are kept) and stop, terminate or keep its pod."""
    toolkit = _toolkit()
    record = toolkit.store.load(job)
    confirm(f"Stop job {record.job_id} on {_machine(record)}?", assume_yes=yes)
    runs.cancel_job(record, toolkit, lambda message: console.print(message, markup=False))


def resume(
    job: str = typer.Argument(..., help="The job id."),
    trials: int | None = typer.Option(None, "--trials", help="Raise the number of trials."),
    gpu: str | None = typer.Option(None, "--gpu", help="GPU type for the new pod."),
    pod: str | None = typer.Option(None, "--pod", help="Continue on this existing pod."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
) -> None:
    """Continue a job from its journal: on its pod if it still exists, else on a new pod."""
    toolkit = _toolkit()
    record = toolkit.store.load(job)
    notify = lambda message: console.print(message, markup=False)  # noqa: E731
    record = resume_service.resume_job(
        record, toolkit, notify, n_trials=trials, gpu=gpu, pod=pod,
        confirm=lambda question: confirm(question, assume_yes=yes),
    )  # fmt: skip
    _follow(record, toolkit, assume_yes=yes, replay=False, restarted=True)


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
    )  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `hctl` application."""
    app.command("run")(run)
    app.command("estimate")(estimate)
    app.command("jobs")(jobs)
    app.command("attach")(attach)
    app.command("logs")(logs)
    app.command("results")(results)
    app.command("cancel")(cancel)
    app.command("resume")(resume)
    app.command("test")(smoke_test)
