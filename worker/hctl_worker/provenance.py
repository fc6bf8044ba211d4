"""What an exported model's card says its scores were measured on.

A score means little without what it counted: which prompts (a hub dataset and its split, a file
of the user's, or the prompts bundled with hctl-worker when the hub was out of reach) and which
refusal detector (heretic's markers, the job's own, markers learned from the model's own
refusals by `baseline_check`, or a classifier). The job's first stages decide these; the job
directory keeps what they decided (`prompt_sources.json`, and `learned_markers.json` written
here), so an export made later (`hctl-worker export`) says the same as one made at the end of
the search.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from hctl_worker.job_prompts import recorded_sources
from hctl_worker.markers import DEFAULT_REFUSAL_MARKERS
from hctl_worker.prompt_source import PromptSource
from hctl_worker.prompts import is_local_file
from hctl_worker.settings import WorkerSettings

LEARNED_FILE = "learned_markers.json"  # in the job directory: markers the baseline learned


def record_learned_markers(job_root: Path | None, markers: Sequence[str]) -> None:
    """Keep the markers the baseline learned (written whole, so workers may write at once)."""
    if job_root is None:
        return
    path = job_root / LEARNED_FILE
    temporary = path.with_name(f"{path.name}.{os.getpid()}.part")
    temporary.write_text(json.dumps(list(markers), indent=2) + "\n", encoding="utf-8")
    temporary.replace(path)


def learned_markers(job_root: Path | None) -> list[str]:
    if job_root is None or not (job_root / LEARNED_FILE).is_file():
        return []
    try:
        markers = json.loads((job_root / LEARNED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [str(marker) for marker in markers] if isinstance(markers, list) else []


def measurement_notes(settings: WorkerSettings, job_root: Path | None) -> list[str]:
    """One line per measurement's inputs: the evaluation prompts, then the refusal detector."""
    recorded = recorded_sources(job_root)
    lines = []
    for table, what in (
        ("bad_evaluation_prompts", "Harmful prompts (refusals)"),
        ("good_evaluation_prompts", "Harmless prompts (divergence from the original)"),
    ):
        lines.append(f"{what}: {_source(getattr(settings, table), recorded.get(table))}")
    lines.append(f"Refusals: {_detector(settings, learned_markers(job_root))}")
    return lines


def _source(source: PromptSource, recorded: str | None) -> str:
    split = f", {source.split}" if source.split else ""
    if recorded == "bundled":
        return f"the prompts bundled with hctl-worker (the hub was out of reach){split}"
    if is_local_file(source):
        return f"a file of the user's, `{Path(source.dataset).name}`{split}"  # not its path
    return f"[{source.dataset}](https://huggingface.co/datasets/{source.dataset}){split}"


def _detector(settings: WorkerSettings, learned: Sequence[str]) -> str:
    names = {choice.name for choice in settings.scorers if choice.optimization != "report"}
    if "RefusalClassifier" in names:
        model = str(settings.refusal_classifier.model)
        return f"judged by the classifier `{Path(model).name if Path(model).exists() else model}`"
    if settings.refusal_markers:
        count = len(settings.refusal_markers)
        text = f"replies containing {'the' if count == 1 else 'one of the'} job's " + (
            "marker" if count == 1 else f"{count} markers"
        )
    else:
        text = f"replies containing one of heretic's {len(DEFAULT_REFUSAL_MARKERS)} markers"
    own = [m for m in settings.extra_refusal_markers if m not in learned]
    if own:
        text += ", or one of the job's own: " + ", ".join(f"`{m}`" for m in own)
    if learned:
        text += ", or one learned from this model's own refusals: " + ", ".join(
            f"`{m}`" for m in learned
        )
    return text


__all__ = ["learned_markers", "measurement_notes", "record_learned_markers"]
