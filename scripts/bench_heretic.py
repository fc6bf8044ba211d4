"""The worker and heretic side by side: same models, same prompts, same settings, alternating runs.

    python scripts/bench_heretic.py                          # SmolLM2 as shipped + the real refuser
    python scripts/bench_heretic.py --model smollm2=/tmp/smollm2/model --trials 10 --repeats 2
    python scripts/bench_heretic.py --heretic /path/to/venv/bin/heretic --json out.json
    python scripts/bench_heretic.py --model big=/tmp/qwen3-4b --device cuda --dtype bfloat16 \
        --hctl-command "python3 scripts/device/hctl_worker_run.py" --hctl-pythonpath worker:/tmp/a \
        --heretic-command "python3 scripts/device/heretic_run.py" --heretic-pythonpath /tmp/b

Each tool's command line and PYTHONPATH can be given (`--hctl-command`, `--heretic-command`,
`--hctl-pythonpath`, `--heretic-pythonpath`): by default `hctl-worker` next to this Python and
heretic's executable (`--heretic`), each with the environment as it is. Both load the model on
`--device` (the config's device_map) in `--dtype`.

Each model is run by `hctl-worker run` and by heretic (headless from a config.toml in a scratch
folder; heretic 1.4.0 asks which trial to export at the end, and its standard input is closed, so
it stops there), in turn: hctl, heretic, hctl, heretic... so that machine load hits both alike.
Both get the same prompt files (the model folder's `prompts/`, else the tiny fixture's), the same
system prompt, dtype, batch size, reply length, trial count and seed, and the same kind of edit.
hctl also measures its harmless-refusal guard, which heretic does not have; with
`--heretics-measurements` it measures only heretic's two objectives (the same work per trial).

Reported per tool and model: seconds per trial (mean and median, from the trials' own start and
end times in each tool's Optuna journal: ask to tell), the search, the run end to end (process
wall time), peak memory (the process's maximum resident set), and heretic / hctl ratios. The
machine's load average is printed with the table: figures from a shared machine are noisy.
And what each run found: its baseline refusals, the best trial with at most 10 % refusals at
KL <= 0.05 (fewest refusals, then lowest KL; the first trial under that bar too), and for hctl,
with --check-harmless, that trial's refusals on the harmless prompts, measured afterwards by the
worker itself (`hctl-worker run --trial K` on the finished job, outside the timings).
Models default to `scripts/make_real_refuser.py --print-path base|refuser` (built on demand).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from heretic_comparison import (
    exit_note,
    heretic_trials,
    journal_trial_seconds,
    print_table,
    quality,
    ratio,
    summary,
)

REPO = Path(__file__).resolve().parent.parent
FIXTURE_PROMPTS = REPO / "tests" / "fixtures" / "tiny-refuser" / "prompts"
SYSTEM_PROMPT = "You are a helpful assistant."
HERETICS_SCORERS = (
    'scorers = [{ name = "KeywordRate", optimization = "minimize" }, '
    '{ name = "KLDivergence", optimization = "minimize" }]'
)
PROMPT_FILES = {
    "good_prompts": "harmless_train",
    "bad_prompts": "harmful_train",
    "good_evaluation_prompts": "harmless_test",
    "bad_evaluation_prompts": "harmful_test",
}


def default_models() -> dict[str, str]:
    maker = REPO / "scripts" / "make_real_refuser.py"
    if not maker.exists():
        raise SystemExit(
            "error: scripts/make_real_refuser.py is not here yet\n"
            "hint: name the models with --model NAME=FOLDER"
        )
    models = {}
    for name, kind in (("smollm2-135m-instruct", "base"), ("smollm2-refuser", "refuser")):
        found = subprocess.run(
            [sys.executable, str(maker), "--print-path", kind],
            capture_output=True,
            text=True,
            check=True,
        )
        models[name] = found.stdout.strip().splitlines()[-1]
    return models


def write_prompts(model: Path, scratch: Path, counts: dict[str, int]) -> dict[str, Path]:
    """The prompt files both tools read: the model's own sets, cut to the counts asked."""
    source = model / "prompts" if (model / "prompts").is_dir() else FIXTURE_PROMPTS
    files = {}
    for key, name in PROMPT_FILES.items():
        lines = [line for line in (source / f"{name}.txt").read_text().splitlines() if line.strip()]
        path = scratch / f"{name}.txt"
        path.write_text("\n".join(lines[: counts[key]]) + "\n")
        files[key] = path
    return files


def config_text(model: Path, prompts: dict[str, Path], arguments, study_dir: Path | None) -> str:
    """One config.toml both tools read (hctl reads heretic's names)."""
    lines = [
        f'model = "{model}"',
        f'dtypes = ["{arguments.dtype}"]',
        f'device_map = "{arguments.device}"',
        f"batch_size = {arguments.batch_size}",
        f"max_response_length = {arguments.max_response_length}",
        f"n_trials = {arguments.trials}",
        f"n_startup_trials = {arguments.startup_trials}",
        f"seed = {arguments.seed}",
        f'system_prompt = "{SYSTEM_PROMPT}"',
        f'row_normalization = "{arguments.row_normalization}"',
    ]
    if study_dir is not None:  # heretic only
        lines += ['response_prefix = ""', f'study_checkpoint_dir = "{study_dir}"']
    for key, path in prompts.items():
        lines.append(f'[{key}]\ndataset = "{path}"')
    return "\n".join(lines) + "\n"


def measured(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict:
    """Run a command: wall seconds, peak RSS (the process's own, from wait4), exit code."""
    started = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    # ru_maxrss is in kilobytes on Linux.
    return {"returncode": process.returncode, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def tool_environment(arguments, pythonpath: str) -> dict[str, str]:
    """One tool's environment: offline, its own PYTHONPATH when one is given, and the same CPU
    thread count for both tools when one is asked for."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.update(HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    if arguments.threads:
        env.update(OMP_NUM_THREADS=str(arguments.threads), MKL_NUM_THREADS=str(arguments.threads))
    return env


def hctl_command(arguments) -> list[str]:
    """How hctl's worker is started: --hctl-command, else `hctl-worker` next to this Python."""
    if arguments.hctl_command:
        return shlex.split(arguments.hctl_command)
    return [str(Path(sys.executable).with_name("hctl-worker"))]


def heretic_command(arguments) -> list[str]:
    """How heretic is started: --heretic-command, else the --heretic executable."""
    if arguments.heretic_command:
        return shlex.split(arguments.heretic_command)
    return [str(arguments.heretic)]


def hctl_harmless_refusals(
    arguments, config: Path, job: Path, number: int, env: dict[str, str]
) -> str:
    """The worker's own check of one trial on the harmless prompts (results/chosen.json)."""
    command = [*hctl_command(arguments), "run", "--config", str(config), "--job-dir", str(job)]
    command += ["--trial", str(number), "--events"]
    subprocess.run(command, env=env, capture_output=True, check=False)
    chosen = job / "results" / "chosen.json"
    if not chosen.exists():
        return "not measured"
    record = json.loads(chosen.read_text())
    scores = record.get("scores", {}).values()
    harmless = next((score for score in scores if score.get("role") == "harmless_refusals"), None)
    if harmless is None or harmless.get("value") is None:
        return "not measured"
    return f"{round(harmless['value'])}/{harmless['of']}"


def run_hctl(model: Path, prompts: dict[str, Path], arguments, scratch: Path) -> dict:
    config = scratch / "hctl.toml"
    # hctl's own settings (e.g. decode_graphs = "auto") go before the tables, in hctl's file only.
    settings = list(arguments.hctl_setting)
    if arguments.heretics_measurements:
        settings.append(HERETICS_SCORERS)
    own = "".join(f"{setting}\n" for setting in settings)
    config.write_text(own + config_text(model, prompts, arguments, None))
    job = scratch / "hctl-job"
    env = tool_environment(arguments, arguments.hctl_pythonpath)
    command = [*hctl_command(arguments), "run", "--config", str(config), "--job-dir", str(job)]
    result = measured(command, scratch, env, scratch / "hctl.log")
    events = (
        [
            json.loads(line)
            for line in (job / "events.jsonl").read_text().splitlines()
            if line.strip()
        ]
        if (job / "events.jsonl").exists()
        else []
    )
    trials = [event for event in events if event.get("type") == "trial"]
    # Both tools' trials are timed the same way: from their Optuna journals.
    journal = job / "study.journal"
    result["trial_seconds"] = journal_trial_seconds(journal) if journal.exists() else []
    result["pruned"] = sum(1 for event in trials if event.get("pruned"))
    result["best_refusals"] = min(
        (e["refusals"] for e in trials if e["refusals"] is not None and not e.get("pruned")),
        default=None,
    )
    for event in events:
        if event.get("type") == "stage" and event.get("stage") == "search" and event.get("seconds"):
            result["search_s"] = float(event["seconds"])
        if event.get("type") == "log" and str(event.get("message", "")).startswith("reuse:"):
            result["reuse"] = event["message"]
        if event.get("type") == "baseline":
            result["baseline"] = f"{event['refusals']}/{event['total_bad']}"
    result["quality"] = quality(
        [
            {**trial, "refusals": None if trial.get("pruned") else trial["refusals"]}
            for trial in trials
        ]
    )
    best = result["quality"]["best_under_bar"]
    if best is not None and arguments.check_harmless:
        result["quality"]["harmless_refusals"] = hctl_harmless_refusals(
            arguments, config, job, best["number"], env
        )
    if result["returncode"] != 0:
        result["log_tail"] = (scratch / "hctl.log").read_text()[-1500:]
    return result


def run_heretic(model: Path, prompts: dict[str, Path], arguments, scratch: Path) -> dict:
    work = scratch / "heretic"
    work.mkdir()
    studies = work / "checkpoints"
    (work / "config.toml").write_text(config_text(model, prompts, arguments, studies))
    env = {**tool_environment(arguments, arguments.heretic_pythonpath), "TERM": "dumb"}
    command = [*heretic_command(arguments), "--model", str(model)]
    result = measured(command, work, env, scratch / "heretic.log")
    journals = list(studies.glob("*.jsonl")) if studies.is_dir() else []
    durations: list[float] = []
    if journals:
        durations = journal_trial_seconds(journals[0])
    result["trial_seconds"] = durations
    if len(durations) < arguments.trials:
        result["log_tail"] = (scratch / "heretic.log").read_text()[-1500:]
    log = (scratch / "heretic.log").read_text(errors="replace")
    result["exit"] = exit_note(
        "heretic", result["returncode"], len(durations), arguments.trials, log
    )
    for line in log.splitlines():
        if "Initial refusals:" in line:
            result["baseline"] = line.split("Initial refusals:")[1].strip()
    result["quality"] = quality(heretic_trials(journals[0]) if journals else [])
    return result


def bench(arguments) -> dict:
    models = dict(item.split("=", 1) for item in arguments.model) or default_models()
    models = {name: str(Path(folder).resolve()) for name, folder in models.items()}
    counts = {
        "good_prompts": arguments.train_prompts,
        "bad_prompts": arguments.train_prompts,
        "good_evaluation_prompts": arguments.eval_prompts,
        "bad_evaluation_prompts": arguments.eval_prompts,
    }
    commands = {"hctl": hctl_command(arguments), "heretic": heretic_command(arguments)}
    results: dict = {"settings": vars(arguments) | {"heretic": str(arguments.heretic)}}
    results["commands"] = commands
    results["load_before"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    runs: dict[str, dict[str, list[dict]]] = {name: {"hctl": [], "heretic": []} for name in models}
    for repeat in range(arguments.repeats):
        for name, folder in models.items():
            for tool, runner in (("hctl", run_hctl), ("heretic", run_heretic)):
                scratch = Path(tempfile.mkdtemp(prefix=f"bench-{tool}-"))
                try:
                    prompts = write_prompts(Path(folder), scratch, counts)
                    run = runner(Path(folder), prompts, arguments, scratch)
                finally:
                    if not arguments.keep:
                        shutil.rmtree(scratch, ignore_errors=True)
                run["repeat"] = repeat
                run["scratch"] = str(scratch) if arguments.keep else None
                runs[name][tool].append(run)
                print(
                    f"[{repeat + 1}/{arguments.repeats}] {name} {tool}: {run['wall_s']:.1f} s, "
                    f"{len(run['trial_seconds'])} trials, "
                    f"{run.get('exit', 'exit ' + str(run['returncode']))}",
                    flush=True,
                )
                if run.get("log_tail"):
                    print(run["log_tail"], file=sys.stderr)
    results["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results["models"] = {}
    for name in models:
        hctl, heretic = summary(runs[name]["hctl"]), summary(runs[name]["heretic"])
        results["models"][name] = {
            "folder": models[name],
            "hctl": hctl,
            "heretic": heretic,
            "ratios": {
                "trial_mean": ratio(heretic["trial_mean_s"], hctl["trial_mean_s"]),
                "trial_median": ratio(heretic["trial_median_s"], hctl["trial_median_s"]),
                "search": ratio(heretic["search_s"], hctl["search_s"]),
                "end_to_end": ratio(heretic["end_to_end_s"], hctl["end_to_end_s"]),
                "peak_rss": ratio(heretic["peak_rss_mb"], hctl["peak_rss_mb"]),
            },
            "pruned_trials": sum(run.get("pruned", 0) for run in runs[name]["hctl"]),
            "reuse": next((run["reuse"] for run in runs[name]["hctl"] if run.get("reuse")), ""),
            "runs": runs[name],
        }
    return results


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="NAME=FOLDER (repeatable)")
    parser.add_argument(
        "--heretic", type=Path, default=None, help="heretic executable (default: heretic on PATH)"
    )
    parser.add_argument(
        "--heretic-command", default="", help="heretic's command line (instead of --heretic)"
    )
    parser.add_argument(
        "--hctl-command", default="", help="the worker's command line (default: hctl-worker)"
    )
    parser.add_argument("--hctl-pythonpath", default="", help="PYTHONPATH for the worker only")
    parser.add_argument("--heretic-pythonpath", default="", help="PYTHONPATH for heretic only")
    parser.add_argument(
        "--hctl-setting", action="append", default=[],
        help='a line of TOML for hctl\'s config only, e.g. \'decode_graphs = "auto"\' (repeatable)',
    )  # fmt: skip
    parser.add_argument(
        "--heretics-measurements", action="store_true",
        help="hctl measures only what heretic does: KeywordRate and KLDivergence, without the "
        "harmless-refusal guard (HarmlessRefusals)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="device_map for both (cpu, cuda, auto)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--startup-trials", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per tool")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-response-length", type=int, default=16)
    parser.add_argument("--eval-prompts", type=int, default=32, help="harmful and harmless each")
    parser.add_argument("--train-prompts", type=int, default=128, help="for the directions, each")
    parser.add_argument("--row-normalization", default="none", choices=["none", "pre", "full"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for both (0: theirs)")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep each run's scratch folder")
    parser.add_argument(
        "--check-harmless",
        action="store_true",
        help="measure hctl's best trial under the bar on the harmless prompts afterwards",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if not arguments.heretic_command:
        found = arguments.heretic or shutil.which("heretic")
        if found is None or not Path(found).exists():
            print(f"error: no heretic at {found or 'heretic on PATH'}", file=sys.stderr)
            print(
                "hint: install it in its own venv (python -m venv /tmp/heretic && "
                "/tmp/heretic/bin/pip install heretic-llm==1.4.0), then give "
                "--heretic /tmp/heretic/bin/heretic, or give --heretic-command",
                file=sys.stderr,
            )
            return 2
        arguments.heretic = Path(found)
    results = bench(arguments)
    print_table(results)
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
