"""What the user asked `hctl run` for, checked completely before anything starts or is rented.

`check_request` refuses options that cannot work together or cannot be right (a budget that is
not a number, a trial number below 1, `--gpu` for a machine hctl does not rent, a download folder
that would be overwritten). `build_worker_settings` then resolves the worker's settings through
the same cascade `hctl-worker` uses — command line (`--trials`, `--set`) > `HERETIC_*`
environment > the `--config` file > defaults — and reads every local prompt file the way the
worker will, so an empty, binary or overlong prompt file is refused here, not after the search
started.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hctl.errors import ConfigError
from hctl.remote.ssh import SshAddress
from hctl.services.models import ModelInfo
from hctl_worker.errors import WorkerError
from hctl_worker.prompts import is_local_file, load_prompts
from hctl_worker.settings import (
    PROMPT_TABLES,
    load_settings,
    parse_assignment,
    read_config_file,
    translate_heretic_keys,
)

REPO_ID = re.compile(r"[\w.\-]+/[\w.\-]+")

# A local model folder may carry its own prompt files in `prompts/` (the test fixtures do); they
# are used for every prompt set the settings do not name, so such a model runs offline.
FOLDER_PROMPTS = {
    "good_prompts": "harmless_train.txt",
    "bad_prompts": "harmful_train.txt",
    "good_evaluation_prompts": "harmless_test.txt",
    "bad_evaluation_prompts": "harmful_test.txt",
}


@dataclass
class RunRequest:
    """What the user asked for on the command line (None: not given there)."""

    model: str
    n_trials: int | None = None  # --trials; else the settings cascade decides
    gpu: str | None = None
    spot: bool = False
    pod: str | None = None
    on: str | None = None  # "local" or "ssh://user@host:port"
    config_file: Path | None = None
    worker_overrides: dict[str, Any] | None = None
    trial: int | None = None  # a trial number, 1-based as the trial lines show them
    download: Path | None = None
    max_cost: float | None = None
    after: Literal["stop", "terminate", "keep"] | None = None
    upload: str | None = None
    params: str | None = None
    image: str | None = None
    job_dir: str | None = None  # --on local: where the job directory goes
    workers: int | None = None  # --workers: workers sharing the search (--on local / ssh)
    gpus: int | None = None  # --gpus: GPUs of a new pod, one worker each
    pods: int | None = None  # --pods: new pods sharing one search (a database on the first)


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items (the value read as TOML, else a string)."""
    values: dict[str, Any] = {}
    for item in items:
        try:
            key, value = parse_assignment(item)
        except WorkerError as error:
            raise ConfigError(error.message, error.hint) from None
        values[key] = value
    return values


def check_request(request: RunRequest) -> None:
    """Refuse what cannot be right whatever the machine; touches nothing."""
    if request.n_trials is not None and request.n_trials < 1:
        raise ConfigError(
            f"--trials must be at least 1, not {request.n_trials}.", "Use --trials 1 or more."
        )
    if request.n_trials is not None and "n_trials" in (request.worker_overrides or {}):
        raise ConfigError(
            "--trials and --set n_trials=... both set the number of trials.", "Give one of them."
        )
    if request.trial is not None and request.trial < 1:
        raise ConfigError(
            f"--trial {request.trial} is not a trial number.",
            "Trials are numbered from 1, as the trial lines show them (trial 3/200 is --trial 3).",
        )
    if request.max_cost is not None and not (
        math.isfinite(request.max_cost) and request.max_cost > 0
    ):
        raise ConfigError(
            f"--max-cost {request.max_cost:g} is not a budget.",
            "Give a budget in USD greater than 0, e.g. --max-cost 2.50.",
        )
    if request.upload is not None and not REPO_ID.fullmatch(request.upload):
        raise ConfigError(
            f"--upload {request.upload!r} is not a Hugging Face repo id.",
            "Write it as USER/NAME, e.g. --upload alice/Qwen3-4B-abliterated.",
        )
    _check_target_options(request)
    _check_counts(request)
    if request.download is not None:
        check_download_folder(request.download)


MAX_GPUS = 8  # the most GPUs one pod offers
MAX_WORKERS = 64
MAX_PODS = 16


def _check_counts(request: RunRequest) -> None:
    """--workers (this machine, an SSH host) and --gpus (a new pod: one worker per GPU)."""
    for option, value, most in (
        ("--workers", request.workers, MAX_WORKERS),
        ("--gpus", request.gpus, MAX_GPUS),
        ("--pods", request.pods, MAX_PODS),
    ):
        if value is not None and not 1 <= value <= most:
            raise ConfigError(
                f"{option} {value} is not a count hctl can run.",
                f"Give {option} from 1 to {most}.",
            )
    if request.workers is not None and request.on is None:
        raise ConfigError(
            "--workers applies to --on local or --on ssh://...; a pod runs one worker per GPU.",
            "On a pod, use --gpus N (one worker per GPU); elsewhere, add --on.",
        )


def _apply(options: list[str]) -> str:
    return "applies" if len(options) == 1 else "apply"


def _check_target_options(request: RunRequest) -> None:
    if request.on is not None and request.pod is not None:
        raise ConfigError("--pod and --on cannot be used together.", "Give one of them.")
    if request.on is not None and request.on != "local" and not request.on.startswith("ssh://"):
        raise ConfigError(
            f"--on {request.on!r} is not a target.",
            "Use --on local, --on ssh://USER@HOST:PORT, or --pod POD_ID.",
        )
    if request.on is not None and request.on.startswith("ssh://"):
        SshAddress.parse(request.on)  # a malformed address is refused here
    pod_only = {
        "--gpu": request.gpu is not None,
        "--spot": request.spot,
        "--image": request.image is not None,
        "--gpus": request.gpus is not None,
        "--pods": request.pods is not None,
        "--keep": request.after == "keep",
        "--terminate": request.after == "terminate",
    }
    if request.on is not None:
        given = [name for name, used in pod_only.items() if used]
        if given:
            raise ConfigError(
                f"{' and '.join(given)} only {_apply(given)} to a pod; --on {request.on} runs "
                "elsewhere.",
                f"Leave out {' and '.join(given)}, or leave out --on to rent a pod.",
            )
    if request.pod is not None:
        new_pod_only = ("--gpu", "--spot", "--image", "--gpus", "--pods")
        given = [name for name in new_pod_only if pod_only[name]]
        if given:
            raise ConfigError(
                f"{' and '.join(given)} only {_apply(given)} to a new pod; --pod {request.pod} "
                "exists already.",
                f"Leave out {' and '.join(given)}, or leave out --pod to rent a new pod.",
            )
    if request.job_dir is not None and request.on != "local":
        raise ConfigError(
            "--output (--job-dir) only applies to --on local.",
            "On a pod or an SSH host the job directory is hctl's; use --download to get the model.",
        )
    if request.job_dir is not None and Path(request.job_dir).expanduser().is_file():
        raise ConfigError(
            f"--output {request.job_dir} is a file; the job needs a folder.",
            "Give a new folder, or the folder of a job to continue.",
        )


def check_download_folder(folder: Path) -> None:
    """A download goes into a new or empty folder: nothing of the user's is overwritten."""
    folder = folder.expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(
            f"--download {folder} is a file, not a folder.",
            "Give a folder that does not exist yet (hctl creates it) or an empty one.",
        )
    if folder.is_dir() and any(folder.iterdir()):
        raise ConfigError(
            f"--download {folder} is not empty; the model's files would overwrite what is there.",
            f"Give a new or empty folder, e.g. --download {folder / 'abliterated'}.",
        )
    existing = next(parent for parent in [folder, *folder.parents] if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--download {folder} cannot be created: {existing} is not a folder you can write to.",
            "Give a folder in a place you can write to.",
        )


def build_worker_settings(request: RunRequest, model: ModelInfo) -> dict[str, Any]:
    """The worker's settings for this job through the cascade, validated here so a mistake
    costs nothing; local prompt files are read and checked as the worker will read them."""
    overrides = dict(request.worker_overrides or {})
    overrides["model"] = str(model.local_path) if model.local_path else model.reference
    if request.n_trials is not None:
        overrides["n_trials"] = request.n_trials
    config_file = request.config_file
    if config_file is not None and not config_file.is_file():
        raise ConfigError(
            f"The worker settings file {config_file} does not exist.",
            "Check the --config path (the worker's config.default.toml shows the format).",
        )
    try:
        named: set[str] = set(overrides)
        if config_file is not None:
            named |= set(translate_heretic_keys(read_config_file(config_file), str(config_file))[0])
        if model.local_path is not None:
            for key, name in FOLDER_PROMPTS.items():
                path = model.local_path / "prompts" / name
                if key not in named and path.is_file():
                    overrides[key] = {"dataset": str(path)}
        settings = load_settings(config_file, overrides)
        for key in PROMPT_TABLES:
            source = getattr(settings, key)
            if is_local_file(source):
                load_prompts(source, key)
    except WorkerError as error:
        raise ConfigError(error.message, error.hint) from None
    values = settings.to_toml_dict()
    # The controller decides the trial, the export and the upload after the search.
    for key in ("trial", "save_directory", "upload_repo"):
        values.pop(key, None)
    return values


def check_trial_number(request: RunRequest, n_trials: int) -> None:
    """`--trial K` must name a trial the search will run."""
    if request.trial is not None and request.trial > n_trials:
        raise ConfigError(
            f"--trial {request.trial} is beyond the search's {n_trials} trials "
            f"(numbered 1-{n_trials} as they finish).",
            f"Choose a trial from 1 to {n_trials}, or leave out --trial to choose at the end.",
        )
