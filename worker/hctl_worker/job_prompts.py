"""A job's four prompt sets, with the prompts bundled with the worker for when the hub is away.

The default sets are heretic's hub datasets (mlabonne/harmless_alpaca, mlabonne/harmful_behaviors).
A pod or machine that cannot reach the hub (no network, `HF_HUB_OFFLINE`, the hub down) would
fail the job at its first stage. So, for a set that is still one of those defaults, and only
when the hub cannot be reached (`prompts.HubUnreachableError`; a dataset the hub answers for with
an error stays an error), the worker uses the prompts bundled in `data/prompts/` instead, with
the same slice, and says so. The bundled prompts are this project's own plain requests in the
same style (written by `scripts/real_refuser_data.py`): 160 harmful and 256 harmless for the
directions, 100 and 100 held out (on other tasks) for the evaluation.

A job keeps what it used. Only its first run (no trial yet) may take a set from the bundle, and
that run records in the job directory (`prompt_sources.json`) where each set came from, and in
the job's study (`shared`) for the workers of the job's other pods, which have job directories of
their own. Every later run of the job (a resume, another worker or pod, the capability check)
takes the same prompts, whether or not the hub answers by then. A job whose sets came from the
hub keeps failing without it, as before: its prompts are those.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from hctl_worker.prompt_source import (
    BAD_EVALUATION_PROMPTS,
    BAD_PROMPTS,
    GOOD_EVALUATION_PROMPTS,
    GOOD_PROMPTS,
    PROMPT_TABLES,
    PromptSource,
)
from hctl_worker.prompts import HubUnreachableError, PromptSets, load_prompts, parse_split
from hctl_worker.settings import WorkerSettings

BUNDLED_DIR = Path(__file__).parent / "data" / "prompts"
BUNDLED_FILES = {
    "good_prompts": "harmless_train.txt",
    "bad_prompts": "harmful_train.txt",
    "good_evaluation_prompts": "harmless_test.txt",
    "bad_evaluation_prompts": "harmful_test.txt",
}
DEFAULT_SOURCES = {
    "good_prompts": GOOD_PROMPTS,
    "bad_prompts": BAD_PROMPTS,
    "good_evaluation_prompts": GOOD_EVALUATION_PROMPTS,
    "bad_evaluation_prompts": BAD_EVALUATION_PROMPTS,
}
RECORD_FILE = "prompt_sources.json"  # in the job directory: the sets taken from the bundle


class SharedRecord(Protocol):
    """Where a job's sets came from, kept where every worker of the job reads it (its study)."""

    def read(self) -> dict[str, str]: ...

    def write(self, record: dict[str, str]) -> None: ...


def load_prompt_sets(
    settings: WorkerSettings,
    job_root: Path | None = None,
    on_note: Callable[[str], None] | None = None,
    *,
    first_run: bool = False,
    shared: SharedRecord | None = None,
) -> PromptSets:
    """The job's four prompt sets (see the module's docstring for the bundled ones)."""
    found = load_job_prompts(
        settings, PROMPT_TABLES, job_root, on_note, first_run=first_run, shared=shared
    )
    return PromptSets(
        good=found["good_prompts"],
        bad=found["bad_prompts"],
        good_evaluation=found["good_evaluation_prompts"],
        bad_evaluation=found["bad_evaluation_prompts"],
    )


def load_job_prompts(
    settings: WorkerSettings,
    tables: Sequence[str],
    job_root: Path | None = None,
    on_note: Callable[[str], None] | None = None,
    *,
    first_run: bool = False,
    shared: SharedRecord | None = None,
) -> dict[str, list[str]]:
    """The prompts of the named settings tables: as the job recorded (`prompt_sources.json`, or
    `shared` when this job directory has no record yet), else from their sources. Only on a
    job's `first_run` (no trial yet, and no record) may a default set the hub cannot give come
    from the bundle; that run records where each set came from, here and in `shared`."""
    own = recorded_sources(job_root)
    recorded = own or (shared.read() if shared is not None else {})
    may_bundle = first_run and not recorded
    found: dict[str, list[str]] = {}
    bundled: list[str] = []  # the tables this run takes from the bundle
    unreachable: str | None = None  # why: the first failure to reach the hub
    for table in tables:
        source: PromptSource = getattr(settings, table)
        default = source.dataset == DEFAULT_SOURCES[table].dataset
        if recorded.get(table) == "bundled" or (may_bundle and unreachable and default):
            found[table] = load_prompts(bundled_source(table, source), table)
            if may_bundle:  # the hub just failed: not asked again
                bundled.append(table)
            continue
        try:
            found[table] = load_prompts(source, table)
        except HubUnreachableError as error:
            if not (may_bundle and default):
                raise
            found[table] = load_prompts(bundled_source(table, source), table)
            bundled.append(table)
            unreachable = error.message
    if may_bundle and len(tables) == len(PROMPT_TABLES):
        record = {table: "bundled" if table in bundled else "settings" for table in tables}
        _record(job_root, record)
        if shared is not None:
            shared.write(record)
    elif recorded and not own:  # another pod's worker chose: this job directory keeps it too
        _record(job_root, recorded)
    if unreachable and on_note is not None:
        on_note(_note(unreachable, bundled, found))
    return found


def bundled_source(table: str, source: PromptSource) -> PromptSource:
    """The bundled file for a table, with the slice of the source's split and its prefix and
    suffix (a split's name means nothing in a text file)."""
    _, start, end = parse_split(source.split)
    split = f"[{start or ''}:{end or ''}]" if start is not None or end is not None else None
    return PromptSource(
        dataset=str(BUNDLED_DIR / BUNDLED_FILES[table]),
        split=split,
        prefix=source.prefix,
        suffix=source.suffix,
    )


def _note(reason: str, bundled: list[str], found: dict[str, list[str]]) -> str:
    counts = ", ".join(f"{table} {len(found[table])}" for table in bundled)
    return (
        f"the hub cannot be reached ({reason}): the job uses the prompts bundled with "
        f"hctl-worker instead ({counts}; plain requests in the style of heretic's datasets), "
        "and keeps them when resumed; set those tables to files of your own for other prompts"
    )


def recorded_sources(job_root: Path | None) -> dict[str, str]:
    """Where the job's sets came from, as its job directory records (empty: no record)."""
    if job_root is None or not (job_root / RECORD_FILE).is_file():
        return {}
    try:
        record = json.loads((job_root / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return (
        {str(table): str(kind) for table, kind in record.items()}
        if isinstance(record, dict)
        else {}
    )


def _record(job_root: Path | None, record: dict[str, str]) -> None:
    if job_root is None:
        return
    path = job_root / RECORD_FILE
    temporary = path.with_name(f"{path.name}.{os.getpid()}.part")  # workers may write at once
    temporary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    temporary.replace(path)


__all__ = [
    "BUNDLED_DIR",
    "BUNDLED_FILES",
    "SharedRecord",
    "load_job_prompts",
    "load_prompt_sets",
    "recorded_sources",
]
