"""Named lm-evaluation-harness tasks on the loaded model, when `lm_eval` is installed.

`lm_eval` is optional (the `evaluate` extra, not the worker's: it pulls in datasets, pandas,
scikit-learn...); without it the capability check says so and measures everything else. A task
is a name lm-eval knows (`piqa`, `arc_easy`...) or the path of a task's YAML file (for a task of
your own, e.g. on local data). Tasks download their data from the hub unless they say otherwise.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel

INSTALL_HINT = "pip install 'hctl[evaluate]'"


def lm_eval_installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def run_benchmarks(
    loaded: LoadedModel, tasks: Sequence[str], *, limit: int | None, batch_size: int
) -> dict[str, float]:
    """Every metric of every task for the model as it is now: {"piqa acc": 0.61, ...}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folders = sorted({str(Path(task).parent) for task in tasks if _is_task_file(task)})
    manager = TaskManager(include_path=folders or None)
    names = [_task_name(task) if _is_task_file(task) else task for task in tasks]
    model = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    result = lm_eval.simple_evaluate(
        model=model, tasks=names, limit=limit, task_manager=manager, log_samples=False
    )
    metrics: dict[str, float] = {}
    for task, values in (result or {}).get("results", {}).items():
        for key, value in values.items():
            # Metrics are reported as "name,filter" ("acc,none"); other keys are bookkeeping.
            metric, comma, _ = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            metrics[f"{task} {metric}"] = float(value)
    return metrics


def _is_task_file(task: str) -> bool:
    return task.endswith((".yaml", ".yml")) and Path(task).expanduser().is_file()


def _task_name(path: str) -> str:
    """The `task:` name a task file declares (lm-eval finds it by that name)."""
    for line in Path(path).expanduser().read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "task" and value.strip():
            return value.strip().strip("\"'")
    return Path(path).stem


__all__ = ["INSTALL_HINT", "lm_eval_installed", "run_benchmarks"]
