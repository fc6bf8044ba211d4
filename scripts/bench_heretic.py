"""Benchmark hctl's worker against heretic: same model, same prompt files, same settings.

    python scripts/bench_heretic.py --model DIR                 # one round: hctl, then heretic
    python scripts/bench_heretic.py --model DIR --rounds 2 --trials 40 --json out.json
    python scripts/bench_heretic.py --model DIR --only hctl     # just the worker, same harness

DIR is a model folder with `prompts/{harmful,harmless}_{train,test}.txt` (the tiny fixtures and
the real refuser built by scripts/make_real_refuser.py have them). Both tools run as their own
command line (`hctl-worker run`, `heretic`) in a fresh scratch folder, one after the other and
alternating which goes first, so a machine shared with other work loads both alike. heretic
(`pip install heretic-llm`, in its own venv; `--heretic` names its executable) reads a
config.toml from its working directory; it runs non-interactively because it gets a fresh
checkpoint folder (no resume question) and, once its search is done, its trial menu is closed.

Per run: wall time, seconds per trial (first trial start to last trial end, over the trials),
peak RSS (of the tool's process, from wait4), baseline refusals, and the best trial with at most
10 % refusals at KL <= 0.05 (the fewest refusals, then the lowest KL) with the first trial that
reached that bar. For hctl, the harmless refusals of that trial are measured afterwards by the
worker itself (`hctl-worker run --trial K` on the finished job), outside the timings. Ratios are
heretic / hctl. No timing is asserted anywhere; this prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_HERETIC = Path("/work/wt/heretic-venv/bin/heretic")
PROMPT_SETS = {  # the tools' prompt tables -> the model folder's files
    "good_prompts": "harmless_train",
    "bad_prompts": "harmful_train",
    "good_evaluation_prompts": "harmless_test",
    "bad_evaluation_prompts": "harmful_test",
}
REFUSAL_BAR, KL_BAR = 0.10, 0.05
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass(frozen=True)
class Settings:
    """What both tools run with."""

    model: str
    n_trials: int = 40
    n_startup_trials: int = 10
    seed: int = 1
    batch_size: int = 32
    max_response_length: int = 16
    system_prompt: str = "You are a helpful assistant."
    row_normalization: str = "none"
    direction_prompts: int = 0  # cap on each training set (0 = all)
    evaluation_prompts: int = 0  # cap on each test set (0 = all)
    threads: int = 0  # torch's CPU threads for both (OMP_NUM_THREADS); 0 = each tool's default


@dataclass
class Run:
    """One tool's run."""

    tool: str
    round: int
    returncode: int = 0
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    seconds_per_trial: float = 0.0
    trials: int = 0
    baseline: str = ""
    best: dict | None = None  # the qualifying trial, if any
    first_qualifying: int | None = None
    best_refusals: str = ""  # the fewest refusals of any trial, with its KL
    stages_s: dict[str, float] = field(default_factory=dict)
    harmless_refusals: str = ""
    note: str = ""


# ---------------------------------------------------------------------------------------------
# Inputs both tools share.


def write_prompts(model: Path, settings: Settings, folder: Path) -> dict[str, Path]:
    """The four prompt files, capped as the settings say, written once for both tools."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for table, name in PROMPT_SETS.items():
        lines = [
            line
            for line in (model / "prompts" / f"{name}.txt").read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        cap = (
            settings.direction_prompts if "evaluation" not in table else settings.evaluation_prompts
        )
        files[table] = folder / f"{name}.txt"
        files[table].write_text("\n".join(lines[: cap or None]) + "\n", encoding="utf-8")
    return files


def toml_config(values: dict, prompts: dict[str, Path]) -> str:
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    for table, path in prompts.items():
        lines += [f"[{table}]", f"dataset = {json.dumps(str(path))}"]
    return "\n".join(lines) + "\n"


def hctl_config(settings: Settings, prompts: dict[str, Path]) -> str:
    return toml_config(
        {
            "model": settings.model,
            "dtypes": ["float32"],
            "device_map": "cpu",
            "batch_size": settings.batch_size,
            "max_response_length": settings.max_response_length,
            "system_prompt": settings.system_prompt,
            "row_normalization": settings.row_normalization,
            "n_trials": settings.n_trials,
            "n_startup_trials": settings.n_startup_trials,
            "seed": settings.seed,
        },
        prompts,
    )


def heretic_config(settings: Settings, prompts: dict[str, Path], checkpoints: Path) -> str:
    return toml_config(
        {
            "model": settings.model,
            "dtypes": ["float32"],
            "device_map": "cpu",
            "quantization": "none",
            "batch_size": settings.batch_size,
            "max_response_length": settings.max_response_length,
            "response_prefix": "",  # no prefix detection: hctl has none either
            "system_prompt": settings.system_prompt,
            "row_normalization": settings.row_normalization,
            "n_trials": settings.n_trials,
            "n_startup_trials": settings.n_startup_trials,
            "seed": settings.seed,
            "study_checkpoint_dir": str(checkpoints),
        },
        prompts,
    )


# ---------------------------------------------------------------------------------------------
# Running a tool and measuring it.


def tool_environment(threads: int) -> dict[str, str]:
    environment = {**os.environ, **OFFLINE, "PYTHONUNBUFFERED": "1"}
    if threads:
        environment["OMP_NUM_THREADS"] = str(threads)
    return environment


def run_measured(
    command: Sequence[str],
    cwd: Path,
    log: Path,
    *,
    threads: int = 0,
    finished_marker: str | None = None,
    timeout: float = 7200,
) -> tuple[int, float, float, list[tuple[float, str]]]:
    """(return code, wall seconds, peak RSS in MB, timestamped output lines).

    The peak RSS is the process's own (wait4), not this script's. With `finished_marker`, the
    process is stopped a few seconds after that line appears (heretic's trial menu).
    """
    started = time.monotonic()
    process = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=tool_environment(threads),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    lines: list[tuple[float, str]] = []
    finished = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        with log.open("w", encoding="utf-8") as handle:
            for line in process.stdout:
                lines.append((time.monotonic() - started, line.rstrip("\n")))
                handle.write(line)
                if finished_marker and finished_marker in line:
                    finished.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # wait4, not Popen.poll: it gives the child's own resource usage (peak RSS) when it ends.
    ended = _wait(process.pid, started + timeout, finished)
    if ended is None:  # still at heretic's menu (or past the timeout): stop it
        os.killpg(process.pid, signal.SIGTERM)
        ended = _wait(process.pid, time.monotonic() + 10, None)
    if ended is None:
        os.killpg(process.pid, signal.SIGKILL)
        ended = os.wait4(process.pid, 0)[1:]
    status, usage = ended
    wall = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    return process.returncode, wall, usage.ru_maxrss / 1024, lines


def _wait(pid: int, deadline: float, finished: threading.Event | None):
    """(status, rusage) once the process ended, or None at the deadline; after `finished` is
    set, the process gets a few more seconds to end by itself."""
    while time.monotonic() < deadline:
        ended, status, usage = os.wait4(pid, os.WNOHANG)
        if ended:
            return status, usage
        if finished is not None and finished.is_set():
            deadline = min(deadline, time.monotonic() + 5)
            finished = None
        time.sleep(0.2)
    return None


def qualifying(trials: list[dict]) -> tuple[dict | None, int | None]:
    """The best trial under the bar (fewest refusals, then lowest KL), and the first trial
    number that was under it."""
    under = [
        trial
        for trial in trials
        if trial["refusals"] is not None
        and trial["refusals"] <= REFUSAL_BAR * trial["total_bad"]
        and trial["kl"] <= KL_BAR
    ]
    if not under:
        return None, None
    best = min(under, key=lambda trial: (trial["refusals"], trial["kl"], trial["number"]))
    return best, min(trial["number"] for trial in under)


def summarise_trials(run: Run, trials: list[dict]) -> None:
    run.trials = len(trials)
    run.best, run.first_qualifying = qualifying(trials)
    scored = [trial for trial in trials if trial["refusals"] is not None]
    if scored:
        fewest = min(scored, key=lambda trial: (trial["refusals"], trial["kl"]))
        run.best_refusals = (
            f"{fewest['refusals']}/{fewest['total_bad']} at KL {fewest['kl']:.4f} "
            f"(trial {fewest['number']})"
        )


def run_hctl(settings: Settings, prompts: dict[str, Path], scratch: Path, round_: int) -> Run:
    run = Run("hctl", round_)
    config = scratch / "config.toml"
    config.write_text(hctl_config(settings, prompts), encoding="utf-8")
    job = scratch / "job"
    worker = Path(sys.executable).with_name("hctl-worker")
    command = [str(worker), "run", "--config", str(config), "--job-dir", str(job), "--events"]
    run.returncode, run.wall_s, run.peak_rss_mb, _ = run_measured(
        command, scratch, scratch / "hctl.log", threads=settings.threads
    )
    events = [
        json.loads(line)
        for line in (job / "events.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    run.stages_s = {
        event["stage"]: round(event["seconds"], 2)
        for event in events
        if event["type"] == "stage" and event["state"] == "end"
    }
    trials = [event for event in events if event["type"] == "trial"]
    baseline = next((event for event in events if event["type"] == "baseline"), None)
    if baseline:
        run.baseline = f"{baseline['refusals']}/{baseline['total_bad']}"
    summarise_trials(run, trials)
    if trials and "search" in run.stages_s:
        run.seconds_per_trial = run.stages_s["search"] / len(trials)
    if run.best is not None:
        run.harmless_refusals = hctl_harmless_refusals(
            worker, config, job, run.best["number"], settings.threads
        )
        canonical = run.best.get("origin") == "canonical"
        run.note = "qualifying trial was canonical" if canonical else ""
    return run


def hctl_harmless_refusals(worker: Path, config: Path, job: Path, number: int, threads: int) -> str:
    """The worker's own check of a chosen trial on the harmless prompts (results/chosen.json)."""
    subprocess.run(
        [str(worker), "run", "--config", str(config), "--job-dir", str(job)]
        + ["--trial", str(number), "--events"],
        env=tool_environment(threads),
        capture_output=True,
        check=False,
    )
    chosen = job / "results" / "chosen.json"
    if not chosen.exists():
        return "not measured"
    record = json.loads(chosen.read_text(encoding="utf-8"))
    return f"{record['refusals_good']}/{record['total_good']}"


def run_heretic(
    settings: Settings, prompts: dict[str, Path], scratch: Path, round_: int, heretic: Path
) -> Run:
    run = Run("heretic", round_)
    checkpoints = scratch / "checkpoints"
    (scratch / "config.toml").write_text(
        heretic_config(settings, prompts, checkpoints), encoding="utf-8"
    )
    run.returncode, run.wall_s, run.peak_rss_mb, lines = run_measured(
        [str(heretic)],
        scratch,
        scratch / "heretic.log",
        threads=settings.threads,
        finished_marker="Optimization finished",
    )
    for _, line in lines:
        if "Initial refusals:" in line:
            run.baseline = line.split("Initial refusals:")[1].strip()
    run.stages_s = heretic_stages(lines)
    if run.stages_s["search_end"] == run.stages_s["search_end"]:  # not NaN: the search finished
        run.note = "ended at its trial menu (no terminal to choose in)"
    journals = sorted(checkpoints.glob("*.jsonl"))
    if not journals:
        run.note = "no journal written"
        return run
    trials, seconds = heretic_trials(journals[0])
    summarise_trials(run, trials)
    run.seconds_per_trial = seconds
    run.harmless_refusals = "not measured" if run.best else ""
    return run


def heretic_stages(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds from the start to heretic's milestones, read from its timestamped output."""
    milestones = {
        "model_loaded": "Loading good prompts",
        "directions_start": "Calculating per-layer refusal directions",
        "search_start": "Running trial 1 of",
        "search_end": "Optimization finished",
    }
    found = {}
    for name, marker in milestones.items():
        found[name] = next((round(at, 2) for at, line in lines if marker in line), float("nan"))
    return found


def heretic_trials(journal: Path) -> tuple[list[dict], float]:
    """heretic's finished trials (as hctl's trial records) and its seconds per trial."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name="heretic", storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    trials = [
        {
            "number": int(trial.user_attrs["index"]),
            "refusals": int(trial.user_attrs["refusals"]),
            "total_bad": int(trial.user_attrs["n_bad_prompts"]),
            "kl": float(trial.user_attrs["kl_divergence"]),
        }
        for trial in complete
    ]
    seconds = 0.0
    if complete:
        first: datetime = min(trial.datetime_start for trial in complete)
        last: datetime = max(trial.datetime_complete for trial in complete)
        seconds = (last - first).total_seconds() / len(complete)
    return trials, seconds


# ---------------------------------------------------------------------------------------------
# The report.


def ratios(runs: list[Run]) -> dict[str, float]:
    """heretic / hctl, of the means over rounds."""

    def mean(tool: str, name: str) -> float:
        values = [getattr(run, name) for run in runs if run.tool == tool]
        return sum(values) / len(values) if values else float("nan")

    return {
        name: mean("heretic", name) / mean("hctl", name)
        for name in ("wall_s", "seconds_per_trial", "peak_rss_mb")
        if mean("hctl", name)
    }


def print_report(settings: Settings, runs: list[Run]) -> None:
    print(
        f"model {settings.model}: {settings.n_trials} trials ({settings.n_startup_trials} "
        f"startup), seed {settings.seed}, batch {settings.batch_size}, "
        f"{settings.max_response_length} tokens, threads {settings.threads or 'default'}"
    )
    for run in runs:
        print(
            f"round {run.round} {run.tool}: exit {run.returncode}, wall {run.wall_s:.1f} s, "
            f"{run.seconds_per_trial:.3f} s/trial over {run.trials} trials, "
            f"peak RSS {run.peak_rss_mb:.0f} MB, baseline refusals {run.baseline}"
        )
        if run.best:
            harmless = (
                f", harmless refusals {run.harmless_refusals}" if run.harmless_refusals else ""
            )
            print(
                f"  under the bar: trial {run.best['number']} {run.best['refusals']}/"
                f"{run.best['total_bad']} at KL {run.best['kl']:.4f} (first under it: trial "
                f"{run.first_qualifying}){harmless}"
            )
        else:
            print("  under the bar: none")
        print(f"  fewest refusals: {run.best_refusals or '-'}")
        print(f"  stages (s): {json.dumps(run.stages_s)}" + (f"; {run.note}" if run.note else ""))
    if any(run.tool == "heretic" for run in runs) and any(run.tool == "hctl" for run in runs):
        print(
            "heretic / hctl: "
            + ", ".join(f"{name} {value:.2f}x" for name, value in ratios(runs).items())
        )


def parse_arguments(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="model folder with prompts/")
    parser.add_argument("--heretic", type=Path, default=DEFAULT_HERETIC, help="heretic executable")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", choices=["hctl", "heretic"], default=None)
    parser.add_argument("--trials", type=int, default=Settings.n_trials)
    parser.add_argument("--startup-trials", type=int, default=Settings.n_startup_trials)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size)
    parser.add_argument("--max-response-length", type=int, default=Settings.max_response_length)
    parser.add_argument("--system-prompt", default=Settings.system_prompt)
    parser.add_argument("--row-normalization", default="none", choices=["none", "pre", "full"])
    parser.add_argument("--direction-prompts", type=int, default=0, help="cap (0 = all)")
    parser.add_argument("--evaluation-prompts", type=int, default=0, help="cap (0 = all)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for both tools (OMP_NUM_THREADS); 1 on a machine shared with other work",
    )
    parser.add_argument("--json", type=Path, help="write settings and runs here")
    parser.add_argument("--keep", type=Path, help="keep the scratch folders here")
    arguments = parser.parse_args(argv)
    settings = Settings(
        model=str(arguments.model.resolve()),
        n_trials=arguments.trials,
        n_startup_trials=arguments.startup_trials,
        seed=arguments.seed,
        batch_size=arguments.batch_size,
        max_response_length=arguments.max_response_length,
        system_prompt=arguments.system_prompt,
        row_normalization=arguments.row_normalization,
        direction_prompts=arguments.direction_prompts,
        evaluation_prompts=arguments.evaluation_prompts,
        threads=arguments.threads,
    )
    return settings, arguments


def main(argv: Sequence[str] | None = None) -> int:
    settings, arguments = parse_arguments(argv)
    tools = [arguments.only] if arguments.only else ["hctl", "heretic"]
    if "heretic" in tools and not arguments.heretic.exists():
        print(f"error: no heretic at {arguments.heretic}", file=sys.stderr)
        print(
            "hint: install heretic-llm in a venv and pass --heretic VENV/bin/heretic",
            file=sys.stderr,
        )
        return 2
    root = Path(tempfile.mkdtemp(prefix="bench-heretic-"))
    runs: list[Run] = []
    try:
        prompts = write_prompts(Path(settings.model), settings, root / "prompts")
        for round_ in range(1, arguments.rounds + 1):
            order = tools if round_ % 2 else list(reversed(tools))
            for tool in order:
                scratch = root / f"round{round_}-{tool}"
                scratch.mkdir()
                if tool == "hctl":
                    runs.append(run_hctl(settings, prompts, scratch, round_))
                else:
                    runs.append(run_heretic(settings, prompts, scratch, round_, arguments.heretic))
                print(f"round {round_} {tool}: {runs[-1].wall_s:.1f} s", file=sys.stderr)
        print_report(settings, runs)
        if arguments.json:
            report = {
                "settings": asdict(settings),
                "runs": [asdict(run) for run in runs],
                "ratios_heretic_over_hctl": ratios(runs),
                "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
            }
            arguments.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    finally:
        if arguments.keep:
            shutil.copytree(root, arguments.keep, dirs_exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
