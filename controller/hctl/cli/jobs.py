"""Commands that show jobs: `jobs`, `results`, `logs`; and how a job's results are shown.

Each reads the local job records (`hctl.services`), refreshed from the job's machine where that
helps, and renders them with `hctl.output`: a table on a terminal, plain lines in a pipe, JSON
with `--json`.
"""

from __future__ import annotations

from typing import Any

import typer

from hctl.output import (
    Column,
    HctlCommand,
    console,
    error_console,
    json_option,
    print_json,
    print_line,
    print_remark,
    print_table,
)
from hctl.services import billing, joblog, sync
from hctl.services.estimate import format_money
from hctl.services.finish import next_steps
from hctl.services.jobs import JobRecord, check_job_id
from hctl.services.progress import JobProgress
from hctl.services.toolkit import Toolkit, default_toolkit
from hctl.services.view import (
    evaluation_columns,
    evaluation_rows,
    pareto_columns,
    pareto_rows,
)
from hctl.settings import load_settings

JOB_HELP = "The job id (`hctl jobs` lists them)."
JOB_COLUMNS = [
    Column("job", whole=True),
    Column("model", whole=True),
    Column("machine", whole=True),
    Column("status"),
    Column("trials", justify="right"),
    Column("best"),
    Column("price", justify="right"),
    Column("cost"),
]


def toolkit() -> Toolkit:
    return default_toolkit(load_settings())


def load_job(toolkit: Toolkit, job: str) -> JobRecord:
    return toolkit.store.load(check_job_id(job))


def machine(record: JobRecord) -> str:
    if record.members:
        return "pods " + ", ".join(member.pod_id for member in record.members)
    if record.target == "pod":
        return f"pod {record.pod_id}"
    return record.address or "this machine"


def search_state(record: JobRecord, progress: JobProgress) -> str:
    if not progress.events_seen and record.status in {"failed", "cancelled"}:
        return "never started"  # its machine never came up, or it was stopped before
    return "finished" if progress.done else ("failed" if progress.error else progress.stage)


def show_results(
    record: JobRecord,
    progress: JobProgress,
    toolkit: Toolkit,
    *,
    status_line: bool = True,
    from_results: bool = False,
) -> None:
    """The front, where the model is, and what to do next (`from_results`: less `hctl results`)."""
    front = progress.front()
    if front:
        rows = pareto_rows(front, chosen=record.chosen_trial)
        print_table(pareto_columns(front), rows, title="Pareto front")
    check = progress.evaluation
    if check is not None:
        title = f"Trial {check.trial} against the original model"
        print_table(evaluation_columns(check), evaluation_rows(check), title=title)
        for note in check.notes:
            print_line(note)
    picture = toolkit.store.picture_path(record.job_id)
    if picture.is_file():
        print_line(f"Pareto plot: {picture}")
    if record.saved_model_dir:
        where = f"pod {record.pod_id}" if record.members else machine(record)  # the first pod
        print_line(f"Saved model (on {where}): {record.saved_model_dir}")
    if record.downloaded_to:
        print_line(f"Downloaded to: {record.downloaded_to}")
    if status_line:
        print_line(f"Job {record.job_id}: {record.status}. {record.message}".rstrip())
    steps = next_steps(record)
    if from_results:
        steps = [step for step in steps if not step[0].startswith("hctl results")]
    if record.status in {"finished", "budget"} and steps:
        print_line("Next:")
        for command, meaning in steps:
            print_line(f"  # {meaning}", style="dim")
            print_line(f"  {command}")


def results_data(
    record: JobRecord, progress: JobProgress, toolkit: Toolkit, billed: float | None
) -> dict[str, Any]:
    picture = toolkit.store.picture_path(record.job_id)
    return {
        "job": record.model_dump(mode="json"),
        "billed": billed,
        "machine": machine(record),
        "search": search_state(record, progress),
        "trials_done": progress.trials_done,
        "n_trials": progress.n_trials or record.n_trials,
        "front": [trial.model_dump() for trial in progress.front()],
        "pareto_plot": str(picture) if picture.is_file() else None,
        "next_steps": [command for command, _ in next_steps(record)],
    }


def jobs(
    pod: str | None = typer.Argument(None, help="Only the jobs of this pod."),
    as_json: bool = json_option(),
) -> None:
    """List the jobs on this computer: where they run, how far they got, what they cost."""
    kit = toolkit()
    listed = [
        (record, sync.local_progress(record, kit))
        for record in kit.store.list()
        if pod is None or record.pod_id == pod
    ]
    bills = billing.billed_by_job([record for record, _ in listed], kit.provider)
    if as_json:
        print_json(
            [
                {**record.model_dump(mode="json"), "trials_done": progress.trials_done,
                 "billed": bills.get(record.job_id)}
                for record, progress in listed
            ]
        )  # fmt: skip
        return
    rows = []
    for record, progress in listed:
        best = progress.best(record.kl_limit or 0.5)
        rows.append([
            record.job_id, record.model, machine(record), record.status,
            f"{progress.trials_done}/{progress.n_trials or record.n_trials}",
            f"#{best.number} {best.refusals}/{best.total_bad} KL {best.kl:.3f}" if best else "—",
            f"{format_money(record.price_per_hour)}/h" if record.target == "pod" else "—",
            billing.bill_text(record, bills.get(record.job_id)),
        ])  # fmt: skip
    if not rows:
        print_remark("No jobs yet: `hctl run MODEL` starts one.")
        return
    print_table(JOB_COLUMNS, rows)


def results(job: str = typer.Argument(..., help=JOB_HELP), as_json: bool = json_option()) -> None:
    """The job's Pareto front, chosen trial and saved model (fresh from its machine if reachable)."""
    kit = toolkit()
    record = load_job(kit, job)
    if record.status == "running" and not sync.sync_job(record, kit):
        error_console.print("(machine not reachable: showing the copy on this computer)")
    progress = sync.local_progress(record, kit)
    bill = billing.billed_by_job([record], kit.provider).get(record.job_id)
    if as_json:
        print_json(results_data(record, progress, kit, bill))
        return
    print_line(
        f"{progress.trials_done}/{progress.n_trials} trials; search {search_state(record, progress)}."
    )
    show_results(record, progress, kit, from_results=True)
    if bill is not None or record.estimated_cost is not None:
        print_line(f"Cost of its pods: {billing.bill_text(record, bill)}.")


def logs(
    job: str = typer.Argument(..., help=JOB_HELP),
    lines: int = typer.Option(50, "--lines", "-n", min=1, help="How many lines from the end."),
    as_json: bool = typer.Option(False, "--json", help="The raw events, one JSON object a line."),
) -> None:
    """The end of the job's log: the worker's messages, its events as readable lines."""
    kit = toolkit()
    record = load_job(kit, job)
    if not record.remote_job_dir:  # its machine never came up: no worker, no log
        reason = f" ({record.message})" if record.message else ""
        print_line(f"Job {record.job_id} never started{reason}: it has no log.")
        return
    if as_json:
        for line in joblog.raw_events(record, kit, lines=lines):
            typer.echo(line)
        return
    log = joblog.readable_log(record, kit, lines=lines)
    if not log.from_machine:
        error_console.print("(machine not reachable: the events copied to this computer)")
    for line in log.lines:
        console.out(line, highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `hctl` application."""
    app.command("jobs", cls=HctlCommand)(jobs)
    app.command("logs", cls=HctlCommand)(logs)
    app.command("results", cls=HctlCommand)(results)
