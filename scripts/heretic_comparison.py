"""bench_heretic.py's figures: trials read from each tool's Optuna journal, what a run found,
and the printed side-by-side table."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

REFUSAL_BAR, KL_BAR = 0.10, 0.05


def quality(trials: Sequence[dict]) -> dict:
    """What a run found: the best trial under the bar, the first one under it, the fewest
    refusals of any trial. `trials` are records with number, refusals, total_bad and kl."""
    scored = [trial for trial in trials if trial["refusals"] is not None]
    under = [
        trial
        for trial in scored
        if trial["refusals"] <= REFUSAL_BAR * trial["total_bad"] and trial["kl"] <= KL_BAR
    ]
    best = min(under, key=lambda t: (t["refusals"], t["kl"], t["number"])) if under else None
    fewest = min(scored, key=lambda t: (t["refusals"], t["kl"])) if scored else None
    return {
        "best_under_bar": best,
        "first_under_bar": min((trial["number"] for trial in under), default=None),
        "fewest_refusals": fewest,
    }


def heretic_trials(journal: Path) -> list[dict]:
    """heretic's finished trials as (number, refusals, total_bad, kl) records, from the user
    attributes its trials carry in its journal."""
    set_attribute = 8  # Optuna's journal code for a trial's user attribute
    attributes: dict[int, dict] = {}
    for line in journal.read_text().splitlines():
        operation = json.loads(line)
        if operation.get("op_code") == set_attribute:
            attributes.setdefault(operation["trial_id"], {}).update(operation["user_attr"])
    return [
        {
            "number": int(values["index"]),
            "refusals": int(values["refusals"]),
            "total_bad": int(values["n_bad_prompts"]),
            "kl": float(values["kl_divergence"]),
        }
        for values in attributes.values()
        if {"index", "refusals", "n_bad_prompts", "kl_divergence"} <= set(values)
    ]


def journal_trial_seconds(journal: Path) -> list[float]:
    """Each finished (complete or pruned) trial's start-to-end seconds, from an Optuna journal;
    trials that ran at once share their stretch of time (`_shared`)."""
    create_trial, set_state, complete, pruned = 4, 6, 1, 2  # Optuna's journal codes
    starts: dict[int, datetime] = {}
    spans: dict[int, tuple[datetime, datetime]] = {}
    created = 0
    for line in journal.read_text().splitlines():
        operation = json.loads(line)
        code = operation.get("op_code")
        if code == create_trial:
            if operation.get("datetime_start"):
                starts[created] = datetime.fromisoformat(operation["datetime_start"])
            created += 1
        elif code == set_state and operation.get("datetime_start"):  # an enqueued trial begins
            starts[operation["trial_id"]] = datetime.fromisoformat(operation["datetime_start"])
        elif code == set_state and operation.get("state") in (complete, pruned):
            trial = operation["trial_id"]
            if trial in starts and operation.get("datetime_complete"):
                end = datetime.fromisoformat(operation["datetime_complete"])
                spans[trial] = (starts[trial], end)
    return _shared(spans)


def _shared(spans: dict[int, tuple[datetime, datetime]]) -> list[float]:
    """Each trial's seconds, in trial order, where trials may have run at once (hctl's
    `trials_together`): trials whose start-to-end spans overlap form one stretch of time,
    shared evenly among them; a trial run alone keeps its own span."""
    stretches: list[tuple[list[int], datetime, datetime]] = []
    for trial in sorted(spans, key=lambda trial: spans[trial][0]):
        start, finish = spans[trial]
        if stretches and start < stretches[-1][2]:
            members, begun, end = stretches[-1]
            stretches[-1] = ([*members, trial], begun, max(end, finish))
        else:
            stretches.append(([trial], start, finish))
    seconds = {
        trial: (end - begun).total_seconds() / len(members)
        for members, begun, end in stretches
        for trial in members
    }
    return [seconds[trial] for trial in sorted(seconds)]


def exit_note(tool: str, returncode: int, trials: int, wanted: int, log: str) -> str:
    """What a run's exit code means: heretic asks which trial to keep once its search is over,
    and with no terminal (stdin closed) that question ends it with EOFError and exit 1, after
    every trial is in its journal."""
    closing_menu = "EOFError" in log and "Which trial do you want" in log
    if tool == "heretic" and returncode != 0 and trials >= wanted and closing_menu:
        return f"exit {returncode} at its closing menu (no terminal), every trial done"
    return f"exit {returncode}"


def summary(runs: Sequence[dict]) -> dict:
    per_trial = [seconds for run in runs for seconds in run.get("trial_seconds", [])]
    return {
        "runs": len(runs),
        "trials": len(per_trial),
        "trial_mean_s": statistics.mean(per_trial) if per_trial else None,
        "trial_median_s": statistics.median(per_trial) if per_trial else None,
        "search_s": statistics.median([sum(run.get("trial_seconds", [])) for run in runs]),
        "end_to_end_s": statistics.median(run["wall_s"] for run in runs),
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        "failed_runs": sum(1 for run in runs if run.get("log_tail")),
    }


def print_table(results: dict) -> None:
    print(
        f"machine load (1/5/15 min): {results['load_before']} before, {results['load_after']} after"
    )
    header = f"{'model':<24} {'':<8} {'mean s/trial':>12} {'median':>8} {'search s':>9} "
    header += f"{'end-to-end s':>12} {'peak MB':>8}"
    print(header)
    for name, entry in results["models"].items():
        for tool in ("hctl", "heretic"):
            row = entry[tool]
            print(
                f"{name:<24} {tool:<8} {_number(row['trial_mean_s']):>12} "
                f"{_number(row['trial_median_s']):>8} {_number(row['search_s']):>9} "
                f"{_number(row['end_to_end_s']):>12} {_number(row['peak_rss_mb'], 0):>8}"
            )
        ratios = entry["ratios"]
        print(
            f"{name:<24} {'ratio':<8} {_number(ratios['trial_mean']):>12} "
            f"{_number(ratios['trial_median']):>8} {_number(ratios['search']):>9} "
            f"{_number(ratios['end_to_end']):>12} {_number(ratios['peak_rss'], 2):>8}"
            "   (heretic / hctl)"
        )
        if entry.get("pruned_trials"):
            print(f"{'':<24} hctl pruned {entry['pruned_trials']} trials; {entry.get('reuse', '')}")
        for tool in ("hctl", "heretic"):
            for run in entry["runs"][tool]:
                print(f"{'':<24} {tool:<8} run {run['repeat'] + 1}: {quality_line(run)}")


def quality_line(run: dict) -> str:
    found = run.get("quality", {})
    best, fewest = found.get("best_under_bar"), found.get("fewest_refusals")
    line = f"baseline {run.get('baseline', '?')} refusals; "
    if best:
        origin = f", {best['origin']}" if best.get("origin") else ""
        harmless = found.get("harmless_refusals")
        line += (
            f"under the bar: trial {best['number']}{origin} {best['refusals']}/"
            f"{best['total_bad']} at KL {best['kl']:.4f} (first: trial {found['first_under_bar']})"
            + (f", harmless refusals {harmless}" if harmless else "")
        )
    else:
        line += "none under the bar"
    if fewest:
        line += (
            f"; fewest refusals {fewest['refusals']}/{fewest['total_bad']} at KL "
            f"{fewest['kl']:.4f} (trial {fewest['number']})"
        )
    return line


def _number(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(first, second):
    return first / second if first and second else None
