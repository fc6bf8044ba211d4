"""Trials per minute of one search run by 1, 2, ... `hctl-worker run` processes on one job
directory (`bench_worker.py --workers 1,2`).

Each count starts that many real workers on a fresh job directory (they share its journal, as
`hctl run --workers N` and `--gpus N` run them), each with one CPU thread (`OMP_NUM_THREADS=1`)
or its own GPU (`--device cuda`: `CUDA_VISIBLE_DEVICES`), and measures the search alone: from
the first trial event to the last, over the trials in between, so loading the model and the
directions (done once per worker, in parallel) do not count. No timing is asserted anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "tiny-refuser"


def fixture_config(
    path: Path,
    *,
    model: Path = FIXTURE,
    device: str = "cpu",
    batch_size: int,
    max_response_length: int,
    n_trials: int,
    system_prompt: str,
) -> Path:
    """A worker config for a model folder with its own prompts/ (the committed fixtures')."""
    prompts = FIXTURE / "prompts"
    lines = [
        f'model = "{model}"',
        'dtypes = ["float32"]',
        f'device_map = "{device}"',
        f"batch_size = {batch_size}",
        f"max_response_length = {max_response_length}",
        f"n_trials = {n_trials}",
        "n_startup_trials = 10",
        "seed = 1",
        f'system_prompt = "{system_prompt}"',
        f'[good_prompts]\ndataset = "{prompts / "harmless_train.txt"}"',
        f'[bad_prompts]\ndataset = "{prompts / "harmful_train.txt"}"',
        f'[good_evaluation_prompts]\ndataset = "{prompts / "harmless_test.txt"}"',
        f'[bad_evaluation_prompts]\ndataset = "{prompts / "harmful_test.txt"}"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_workers(config: Path, job_dir: Path, count: int, *, gpus: bool) -> tuple[float, list]:
    """Run `count` workers on one job directory to the end; (wall seconds, events)."""
    executable = Path(sys.executable).with_name("hctl-worker")
    started = time.perf_counter()
    processes = []
    for number in range(1, count + 1):
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if gpus:
            environment["CUDA_VISIBLE_DEVICES"] = str(number - 1)
        command = [str(executable), "run", "--config", str(config), "--job-dir", str(job_dir)]
        processes.append(
            subprocess.Popen(
                [*command, "--worker", str(number), "--events"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=environment,
            )
        )
    failures = []
    for process in processes:
        _, stderr = process.communicate()
        if process.returncode != 0:
            failures.append(stderr[-1500:])
    wall = time.perf_counter() - started
    if failures:
        raise RuntimeError("a worker failed:\n" + "\n".join(failures))
    events_path = job_dir / "events.jsonl"
    events = [json.loads(line) for line in events_path.read_text().splitlines() if line.strip()]
    return wall, events


def search_rate(events: list[dict]) -> dict:
    """Trials per minute between the first and the last trial event (both workers' trials)."""
    trials = [event for event in events if event["type"] == "trial"]
    if len(trials) < 2:
        return {"trials": len(trials)}
    span = trials[-1]["ts"] - trials[0]["ts"]
    by_worker: dict[str, int] = {}
    for trial in trials:
        by_worker[trial.get("run_by", "")] = by_worker.get(trial.get("run_by", ""), 0) + 1
    return {
        "trials": len(trials),
        "search_s": round(span, 2),
        # The trials after the first, over the time from the first's end to the last's end.
        "trials_per_minute": round(60 * (len(trials) - 1) / span, 2) if span > 0 else None,
        "by_worker": by_worker,
    }


def measure(
    counts: list[int],
    *,
    n_trials: int,
    batch_size: int,
    max_response_length: int,
    system_prompt: str,
    model: Path = FIXTURE,
    device: str = "cpu",
) -> list[dict]:
    results = []
    for count in counts:
        with tempfile.TemporaryDirectory() as scratch:
            config = fixture_config(
                Path(scratch) / "config.toml", model=model, device=device,
                batch_size=batch_size, max_response_length=max_response_length,
                n_trials=n_trials, system_prompt=system_prompt,
            )  # fmt: skip
            wall, events = run_workers(config, Path(scratch) / "job", count, gpus=device == "cuda")
        results.append({"workers": count, "wall_s": round(wall, 2), **search_rate(events)})
        print(json.dumps(results[-1]), flush=True)
    return results
