"""Export a chosen trial: a merged model folder, an upload to the hub with a model card, a chat.

The saved folder computes what the trial computed during the search: the same `Ablator` edits
the same loaded weights, merged instead of hooked (`Ablator.merge`), then `save_pretrained` writes
safetensors, the tokenizer and its chat template. The hub token is read from `HF_TOKEN` and never
printed, logged, put in an event or in an error message.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import torch

from hctl_worker import __version__
from hctl_worker.ablation import AblationParams, Ablator
from hctl_worker.errors import ExportError
from hctl_worker.events import EvaluationEvent
from hctl_worker.model import LoadedModel, load_model
from hctl_worker.trials import Score, Trial

if TYPE_CHECKING:
    from hctl_worker.settings import WorkerSettings

TOKEN_VARIABLE = "HF_TOKEN"


@dataclass(frozen=True)
class Exported:
    directory: Path | None
    repo: str | None

    def summary(self) -> str:
        parts = []
        if self.directory:
            parts.append(f"saved to {self.directory}")
        if self.repo:
            parts.append(f"uploaded to https://huggingface.co/{self.repo}")
        return "; ".join(parts)


def export_trial(
    loaded: LoadedModel,
    ablator: Ablator,
    trial: Trial,
    settings: WorkerSettings,
    *,
    save_directory: str | None = None,
    upload_repo: str | None = None,
    upload_private: bool | None = None,
    baseline: Mapping[str, Score] | None = None,
    evaluation: EvaluationEvent | None = None,
    measured_on: Sequence[str] = (),
    on_message: Callable[[str], None] | None = None,
) -> Exported:
    """Merge the trial into `loaded` (for good) and save and/or upload it."""
    save_directory = save_directory or settings.save_directory
    upload_repo = upload_repo or settings.upload_repo
    private = settings.upload_private if upload_private is None else upload_private
    if not save_directory and not upload_repo:
        raise ExportError(
            "nothing to export to", "Give --save-directory DIR and/or --upload-repo USER/NAME."
        )
    token = os.environ.get(TOKEN_VARIABLE) if upload_repo else None
    if upload_repo and not token:
        raise ExportError(
            f"uploading needs a hub token in {TOKEN_VARIABLE}",
            f"Set {TOKEN_VARIABLE} to a write token from https://huggingface.co/settings/tokens.",
        )
    if save_directory:
        check_save_directory(save_directory, settings.model or loaded.source)
    ablator.merge(AblationParams.from_dict(trial.ablation))
    card = model_card(settings.model or loaded.source, trial, baseline, evaluation, measured_on)
    directory = Path(save_directory).expanduser() if save_directory else None
    if directory is None:
        import tempfile

        directory = Path(tempfile.mkdtemp(prefix="hctl-export-"))
    save_model(loaded, directory, card, max_shard_size=settings.max_shard_size)
    if on_message:
        on_message(f"saved trial {trial.number} to {directory}")
    repo = None
    if upload_repo:
        assert token is not None
        repo = upload_folder(directory, upload_repo, token=token, private=private)
        if on_message:
            on_message(f"uploaded trial {trial.number} to {repo}")
    return Exported(directory=directory if save_directory else None, repo=repo)


# The tag every model card this worker writes carries: a folder with such a card is an earlier
# export, which a new one may replace.
EXPORT_TAG = "\n- hctl\n"


def check_save_directory(directory: str, model: str, job_dir: Path | None = None) -> None:
    """ExportError when saving into `directory` would overwrite what an export did not write:
    the model's own folder (the original weights), the job directory, or a folder that holds
    other files. An empty or new folder, or an earlier export, is fine."""
    target = Path(directory).expanduser().resolve()
    hint = "Give a new or empty folder (or one an earlier export wrote) as the save directory."
    if target == Path(model).expanduser().resolve():
        raise ExportError(
            f"the save directory {directory} is the model's own folder: saving there would "
            "overwrite the original model",
            hint,
        )
    if job_dir is not None and target == job_dir.expanduser().resolve():
        raise ExportError(f"the save directory {directory} is the job directory itself", hint)
    if target.is_file():
        raise ExportError(f"the save directory {directory} is a file", hint)
    if not target.is_dir() or not any(target.iterdir()):
        return
    card = target / "README.md"
    earlier = card.is_file() and EXPORT_TAG in card.read_text(encoding="utf-8", errors="replace")
    if not earlier:
        present = ", ".join(sorted(path.name for path in target.iterdir())[:3])
        raise ExportError(
            f"the save directory {directory} already holds files an export did not write "
            f"({present}...): saving there could overwrite them",
            hint,
        )


def save_model(loaded: LoadedModel, directory: Path, card: str, *, max_shard_size: str) -> None:
    """safetensors weights, config, tokenizer (with its chat template) and README.md."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        loaded.model.save_pretrained(directory, max_shard_size=max_shard_size)
        loaded.tokenizer.save_pretrained(directory)
        (directory / "README.md").write_text(card, encoding="utf-8")
    except OSError as error:
        raise ExportError(
            f"cannot save the model to {directory}: {error.strerror or error}",
            "Choose a save directory on a volume with enough free space (about the model's size).",
        ) from None


def model_card(
    base_model: str,
    trial: Trial,
    baseline: Mapping[str, Score] | None = None,
    evaluation: EvaluationEvent | None = None,
    measured_on: Sequence[str] = (),
) -> str:
    """A hub model card: where the model comes from, its scores (against the original's when
    known) and what they were measured on, the capability check when one was run, and the
    edit's parameters."""
    rows = "\n".join(
        f"| `{name}` | {_format(value)} |" for name, value in sorted(trial.params.items())
    )
    base_id = base_model if "/" in base_model and not Path(base_model).exists() else None
    front_matter = "---\n" + (f"base_model: {base_id}\n" if base_id else "")
    front_matter += f"tags:{EXPORT_TAG}- abliterated\n- uncensored\n---\n"
    return (
        f"{front_matter}\n"
        f"# {Path(base_model).name} (abliterated)\n\n"
        f"This is `{base_id or Path(base_model).name}` with its refusal direction removed from the weights by hctl "
        f"{__version__} (directional ablation searched with Optuna, after heretic). "
        f"It was trial {trial.number} of the search.\n\n"
        "## Scores\n\n"
        "| score | what it measures | original model | this model |\n|---|---|---|---|\n"
        + "".join(
            f"| {name} | {SCORE_MEANINGS.get(name, '')} | "
            f"{baseline[name].display() if baseline and name in baseline else ''} | "
            f"{score.display()} |\n"
            for name, score in trial.scores.items()
        )
        + "\n"
        + ("What the scores counted:\n\n" if measured_on else "")
        + "".join(f"- {line}\n" for line in measured_on)
        + ("\n" if measured_on else "")
        + (_evaluation_section(evaluation) if evaluation is not None else "")
        + "## Parameters\n\n"
        "| parameter | value |\n|---|---|\n"
        f"{rows}\n"
    )


SCORE_MEANINGS = {
    "KeywordRate": "harmful prompts refused (refusal markers in the reply)",
    "RefusalClassifier": "harmful prompts refused (judged by a refusal classifier)",
    "HarmlessRefusals": "harmless prompts refused",
    "KLDivergence": "KL divergence from the original, first token of harmless replies",
    "MultiTokenKL": "KL divergence from the original along its own harmless replies",
}


def _evaluation_section(evaluation: EvaluationEvent) -> str:
    lines = "".join(
        f"| {measure.name} | {measure.display(measure.original)} | "
        f"{measure.display(measure.edited)} |\n"
        for measure in evaluation.measures
    )
    notes = "".join(f"- {note}\n" for note in evaluation.notes)
    return (
        "## Capability check\n\n"
        "| measure | original model | this model |\n|---|---|---|\n"
        f"{lines}\n" + (f"{notes}\n" if notes else "")
    )


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class HubApi(Protocol):
    def create_repo(self, repo_id: str, *, private: bool, exist_ok: bool) -> Any: ...

    def upload_folder(self, *, folder_path: str, repo_id: str, commit_message: str) -> Any: ...


def upload_folder(
    directory: Path, repo: str, *, token: str, private: bool, api: HubApi | None = None
) -> str:
    """Create the repo (if needed) and upload the folder. Errors never carry the token."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(directory),
            repo_id=repo,
            commit_message="Upload abliterated model (hctl)",
        )
    except Exception as error:  # the hub client raises many kinds; the user needs the message
        message = redact(str(error).splitlines()[0] if str(error) else type(error).__name__, token)
        raise ExportError(
            f"upload to {repo} failed: {message}",
            f"Check that {TOKEN_VARIABLE} is a write token for that user or organisation, "
            f"and the network. The saved model is kept in {directory}; "
            "retry with hctl-worker export --upload-repo.",
        ) from None
    return repo


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


# ----------------------------------------------------------------------------------------------
# Chat with a saved model.


def chat(
    model_dir: str,
    *,
    system_prompt: str | None,
    max_new_tokens: int,
    input_stream: IO[str] | None = None,
    output: IO[str] | None = None,
    dtypes: Iterable[str] = ("auto", "float16", "bfloat16", "float32"),
    device_map: str | Mapping[str, Any] = "auto",
) -> int:
    """Talk to a model: one user line in, one greedy reply out, until end of input or "/exit".

    It never waits on anything but its input, so it also works with piped input (headless).
    Returns the number of replies given.
    """
    input_stream = input_stream or sys.stdin
    output = output or sys.stdout
    loaded = load_model(
        model_dir,
        dtypes=tuple(dtypes),
        device_map=dict(device_map) if isinstance(device_map, Mapping) else device_map,
    )
    interactive = input_stream.isatty() and output.isatty()
    messages: list[dict[str, str]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    replies = 0
    while True:
        if interactive:
            output.write("> ")
            output.flush()
        line = input_stream.readline()
        if not line or line.strip() in {"/exit", "/quit"}:
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        text = loaded.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        inputs = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(
            loaded.input_device
        )
        with torch.inference_mode():
            generated = loaded.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=loaded.tokenizer.pad_token_id,
            )
        reply = loaded.tokenizer.decode(
            generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        ).strip()
        messages.append({"role": "assistant", "content": reply})
        output.write(reply + "\n")
        output.flush()
        replies += 1
    return replies
