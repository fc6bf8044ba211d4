"""The `hctl-worker` command line: run (or continue) a job, list its Pareto front, export, chat.

```
hctl-worker run --config FILE --job-dir DIR [--storage URL] [--worker NAME] [--events] [--n-trials N]
                [--model M] [--set KEY=VALUE]
hctl-worker pareto --job-dir DIR [--json]
hctl-worker trials --job-dir DIR [--events]
hctl-worker export --job-dir DIR --trial K [--save-directory DIR] [--upload-repo USER/NAME]
hctl-worker evaluate --job-dir DIR --trial K [--events]
hctl-worker chat MODEL_DIR
hctl-worker version | --version
```

Several workers may run one search: on one job directory (they share its journal), or each on
its own job directory with `--storage postgresql://USER@HOST:PORT/DATABASE` (the password in
PGPASSWORD, never on the command line).

Commands are thin: parse, call one function of `pipeline` / `export`, render. Every expected failure
is a WorkerError, printed as `error: ...` and `hint: ...` on stderr with its exit code (and, for
commands on a job directory, also written as an `error` event); never a traceback.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from hctl_worker import __version__
from hctl_worker.command_line import HctlCommand, HctlGroup, render_error
from hctl_worker.errors import WorkerError, disk_error

app = typer.Typer(
    name="hctl-worker",
    cls=HctlGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Abliterate a language model with a resumable multi-objective Optuna search.",
)

INTERRUPTED_EXIT_CODE = 130


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"hctl-worker {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version."
        ),
    ] = False,
) -> None:
    """Abliterate a language model with a resumable multi-objective Optuna search."""


# The worker extra's libraries: a laptop install (`pip install hctl`) has hctl-worker without them.
WORKER_LIBRARIES = {"torch", "transformers", "accelerate", "optuna", "safetensors", "numpy"}


@contextmanager
def user_errors(folder: Path | None = None) -> Iterator[None]:
    """Expected failures become two lines on stderr and the error's exit code; a write the
    system refused too (a full disk: named by its file, else by `folder`, where it was writing)."""
    try:
        yield
    except WorkerError as error:
        render_error(error)
        raise typer.Exit(error.exit_code) from None
    except OSError as error:
        refused = disk_error(error, folder)
        if refused is None:
            raise
        render_error(refused)
        raise typer.Exit(refused.exit_code) from None
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in WORKER_LIBRARIES:
            raise
        render_error(
            WorkerError(
                f"hctl-worker needs {error.name}, which this installation lacks (a laptop install "
                "has the controller only)",
                "Install the worker's libraries: pip install 'hctl[worker]' (CPU torch first: "
                "pip install torch --index-url https://download.pytorch.org/whl/cpu).",
            )
        )
        raise typer.Exit(3) from None
    except KeyboardInterrupt:
        sys.stderr.write("stopped; run the same command again to continue\n")
        raise typer.Exit(INTERRUPTED_EXIT_CODE) from None


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """A SIGTERM (pod stop, `kill`) ends the current trial as failed, like Ctrl+C."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (an embedding program): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _event_printer(event: Any) -> None:
    from hctl_worker.events import encode

    sys.stdout.write(encode(event) + "\n")
    sys.stdout.flush()


JobDir = Annotated[Path, typer.Option("--job-dir", help="The job directory (created if missing).")]
# A finished trial of the job, by the number `pareto` shows.
TrialNumber = Annotated[
    int, typer.Option("--trial", min=1, help="The trial number (as `pareto` shows it).")
]


@app.command(cls=HctlCommand)
def run(
    job_dir: JobDir,
    config: Annotated[
        Path | None, typer.Option("--config", help="Settings file (else ./config.toml).")
    ] = None,
    events: Annotated[
        bool, typer.Option("--events", help="Print events as JSON lines instead of a live view.")
    ] = False,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="Share the study with workers on other machines: postgresql://USER@HOST:PORT/DB "
            "(password in PGPASSWORD). Default: the journal in the job directory.",
        ),
    ] = None,
    worker: Annotated[
        str | None,
        typer.Option(
            "--worker", help="This worker's name in the job (default: the lowest free number)."
        ),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Hub id or local folder.")] = None,
    n_trials: Annotated[int | None, typer.Option(help="Finished trials to reach.")] = None,
    n_startup_trials: Annotated[int | None, typer.Option(help="Random trials first.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the search.")] = None,
    trial: Annotated[
        int | None,
        typer.Option(
            help="Trial number to choose after the search (as `pareto` shows it); "
            "default: the best automatically."
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="0 = find the fastest.")] = None,
    max_response_length: Annotated[int | None, typer.Option(help="Tokens per reply.")] = None,
    system_prompt: Annotated[str | None, typer.Option(help='"" for no system turn.')] = None,
    save_directory: Annotated[str | None, typer.Option(help="Save the chosen trial here.")] = None,
    upload_repo: Annotated[
        str | None, typer.Option(help="Upload the chosen trial (HF_TOKEN).")
    ] = None,
    assignments: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any setting as KEY=VALUE (TOML value); repeatable."),
    ] = None,
) -> None:
    """Run the search in JOB_DIR, or continue it: the same command again resumes; a larger
    --n-trials adds trials."""
    overrides = {
        "model": model,
        "n_trials": n_trials,
        "n_startup_trials": n_startup_trials,
        "seed": seed,
        "trial": trial,
        "batch_size": batch_size,
        "max_response_length": max_response_length,
        "system_prompt": system_prompt,
        "save_directory": save_directory,
        "upload_repo": upload_repo,
    }
    listener = _event_printer if events else None
    with user_errors(job_dir):
        from hctl_worker.settings import load_settings, parse_assignment

        try:
            for text in assignments or []:
                key, value = parse_assignment(text)
                overrides[key] = value
            settings = load_settings(config, overrides)
        except WorkerError as error:
            _record_failure(job_dir, error, listener)
            raise
        with _stop_on_sigterm():
            _run_with_view(
                lambda listeners: _run_job(settings, job_dir, listeners, storage, worker), listener
            )


def _run_job(
    settings: Any, job_dir: Path, listeners: list, storage: str | None, worker: str | None
) -> None:
    from hctl_worker.pipeline import run_job

    run_job(settings, job_dir, listeners, storage_url=storage, worker=worker)


def _record_failure(job_dir: Path, error: WorkerError, listener: Callable | None) -> None:
    """A failure before the job starts still becomes an `error` event in its job directory (the
    controller made it and follows it); a directory that does not exist is not created for it."""
    from hctl_worker.job_directory import open_job_directory
    from hctl_worker.reporter import Reporter, report_error

    if not job_dir.expanduser().is_dir():
        return
    try:
        reporter = Reporter(open_job_directory(job_dir), [listener] if listener else [])
    except (WorkerError, OSError):
        return
    try:
        report_error(reporter, error)
    finally:
        reporter.close()


def _run_with_view(body: Callable[[list], None], listener: Callable | None) -> None:
    if listener is not None:
        body([listener])
        return
    from hctl_worker.progress import ProgressView

    with ProgressView() as view:
        body([view])


@app.command(cls=HctlCommand)
def pareto(
    job_dir: JobDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the job's Pareto front: trial number (for `--trial`) and every score."""
    with user_errors():
        from hctl_worker.job_directory import JobPaths, read_front

        front = read_front(JobPaths(job_dir))
        if as_json:
            typer.echo(json.dumps([trial.model_dump() for trial in front], indent=2))
            return
        from rich.console import Console

        from hctl_worker.progress import pareto_table

        Console().print(pareto_table(front))


@app.command(cls=HctlCommand)
def trials(
    job_dir: JobDir,
    events: Annotated[
        bool, typer.Option("--events", help="Print each trial as its trial event (JSON lines).")
    ] = False,
) -> None:
    """List every finished trial of the job's study, whichever worker or pod ran it."""
    with user_errors():
        from hctl_worker.job_directory import JobPaths, finished_trials, stored_settings

        paths = JobPaths(job_dir)
        found = sorted(finished_trials(paths), key=lambda trial: trial.number)
        if events:
            from hctl_worker.events import TrialEvent

            n_trials = stored_settings(paths).n_trials
            for trial in found:
                _event_printer(
                    TrialEvent.of(trial, n_trials).model_copy(update={"worker": trial.run_by})
                )
            return
        from rich.console import Console

        from hctl_worker.progress import pareto_table

        Console().print(pareto_table(found, title="Trials"))


@app.command(cls=HctlCommand)
def export(
    job_dir: JobDir,
    trial: TrialNumber,
    save_directory: Annotated[str | None, typer.Option(help="Save the merged model here.")] = None,
    upload_repo: Annotated[str | None, typer.Option(help="Upload to USER/NAME (HF_TOKEN).")] = None,
    private: Annotated[
        bool | None, typer.Option("--private/--public", help="Hub visibility.")
    ] = None,
    events: Annotated[bool, typer.Option("--events", help="Print events as JSON lines.")] = False,
) -> None:
    """Save (and/or upload) trial K of a job as a merged model, once its search has ended."""
    listener = _event_printer if events else None
    with user_errors(job_dir):
        from hctl_worker.job_export import export_job

        _run_with_view(
            lambda listeners: export_job(
                job_dir,
                trial,
                save_directory=save_directory,
                upload_repo=upload_repo,
                upload_private=private,
                listeners=listeners,
            ),
            listener,
        )


@app.command(cls=HctlCommand)
def evaluate(
    job_dir: JobDir,
    trial: TrialNumber,
    events: Annotated[bool, typer.Option("--events", help="Print events as JSON lines.")] = False,
) -> None:
    """Check trial K against the original model: perplexity on held-out text, every scorer on
    the evaluation prompts, and the `benchmarks` lm-eval tasks when lm_eval is installed."""
    listener = _event_printer if events else None
    with user_errors(job_dir):
        from hctl_worker.checkup import evaluate_job

        checked: list = []
        _run_with_view(
            lambda listeners: checked.append(evaluate_job(job_dir, trial, listeners=listeners)),
            listener,
        )
        if not events:
            from rich.console import Console

            from hctl_worker.progress import evaluation_table

            console = Console()
            console.print(evaluation_table(checked[0]))
            for note in checked[0].notes:
                console.print(note, soft_wrap=True, markup=False, highlight=False)


@app.command(cls=HctlCommand)
def chat(
    model_dir: Annotated[str, typer.Argument(help="A saved model folder (or hub id).")],
    system_prompt: Annotated[str | None, typer.Option(help="System turn, if any.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest reply.")] = 256,
) -> None:
    """Talk to a model: a line in, a reply out; ends at end of input or /exit."""
    with user_errors():
        from hctl_worker.export import chat as chat_with

        chat_with(model_dir, system_prompt=system_prompt, max_new_tokens=max_new_tokens)


@app.command(cls=HctlCommand)
def version() -> None:
    """Show the version."""
    typer.echo(__version__)


def main() -> None:
    app()
