"""Prompt sets: from a local text file (one prompt per line) or a hub dataset (id, split, column).

A local file is read directly. A hub dataset goes through the `datasets` library when it is
installed; without it, `huggingface_hub` downloads the split's JSON / JSON Lines / CSV / Parquet
files (Parquet needs `pyarrow`). Every failure is a PromptError with a hint.

A prompt longer than `MAX_PROMPT_CHARACTERS` is refused: the directions and every evaluation run
the model over whole prompts, so one runaway line (a file with no line breaks) would hold the
worker for many minutes and gigabytes, and no refusal benchmark needs such prompts.
"""

from __future__ import annotations

import csv
import json
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from hctl_worker.errors import PromptError
from hctl_worker.settings import SPLIT_PATTERN, PromptSource

MAX_PROMPT_CHARACTERS = 16_000  # about 4,000 tokens; benchmark prompts are far shorter


class HubUnreachableError(PromptError):
    """The hub could not be reached (no network, offline mode, the hub down), as opposed to a
    dataset, split or column it does not have."""


@dataclass(frozen=True)
class PromptSets:
    """The four prompt sets a job needs."""

    good: list[str]  # harmless, for the refusal directions
    bad: list[str]  # harmful, for the refusal directions
    good_evaluation: list[str]  # harmless, for KL (and the harmless refusal check)
    bad_evaluation: list[str]  # harmful, for counting refusals


def load_prompts(source: PromptSource, setting: str = "prompts") -> list[str]:
    """The prompts of one source, sliced by its split, with its prefix and suffix."""
    split_name, start, end = parse_split(source.split)
    path = Path(source.dataset).expanduser()
    if path.is_file():
        prompts = _read_text_file(path, setting)
    elif not path.exists() and _looks_local(source.dataset):
        raise PromptError(
            f"{setting}: prompt file {source.dataset} does not exist",
            "Give a text file with one prompt per line, or a hub dataset id like "
            "mlabonne/harmless_alpaca.",
        )
    else:  # a hub id, or a folder saved by `datasets`
        limit = int(end) if end is not None and end.isdigit() else None
        prompts = _read_hub_dataset(source, split_name or "train", setting, limit)
    prompts = prompts[_slice(start, end, len(prompts))]
    if not prompts:
        raise PromptError(
            f"{setting}: no prompts in {source.dataset}"
            + (f" (split '{source.split}')" if source.split else ""),
            "Put one prompt per line in the file (blank lines are skipped), or widen the split.",
        )
    _check_lengths(prompts, source, setting)
    return [
        " ".join(part for part in (source.prefix, prompt, source.suffix) if part)
        for prompt in prompts
    ]


def is_local_file(source: PromptSource) -> bool:
    """Whether `source` names a local text file (present or not), not a hub dataset or a folder."""
    path = Path(source.dataset).expanduser()
    return path.is_file() or (not path.exists() and _looks_local(source.dataset))


def _check_lengths(prompts: list[str], source: PromptSource, setting: str) -> None:
    for number, prompt in enumerate(prompts, start=1):
        if len(prompt) > MAX_PROMPT_CHARACTERS:
            raise PromptError(
                f"{setting}: prompt {number} of {source.dataset} is {len(prompt):,} characters "
                f"long; prompts are limited to {MAX_PROMPT_CHARACTERS:,}",
                "Shorten or remove it (one prompt per line; a file without line breaks is one "
                "prompt), or choose a split without it.",
            )


def parse_split(split: str | None) -> tuple[str, str | None, str | None]:
    """`'train[:400]'` -> ('train', None, '400'); `'[10:20%]'` -> ('', '10', '20%')."""
    if split is None:
        return "", None, None
    match = SPLIT_PATTERN.fullmatch(split.strip())
    if match is None:  # settings validate splits; this is for direct callers
        raise PromptError(f"'{split}' is not a split", "Write e.g. 'train[:400]' or '[:50]'.")
    return match.group("name") or "", match.group("start"), match.group("end")


def _slice(start: str | None, end: str | None, length: int) -> slice:
    def bound(text: str | None) -> int | None:
        if text is None:
            return None
        if text.endswith("%"):
            return round(length * int(text[:-1]) / 100)
        return int(text)

    return slice(bound(start), bound(end))


def _looks_local(dataset: str) -> bool:
    """A path-like name (an extension, a leading ./ or /) that is not a hub id."""
    return (
        dataset.startswith(("/", ".", "~"))
        or bool(re.search(r"\.(txt|jsonl?|csv|parquet)$", dataset))
        or dataset.count("/") > 1
    )


def _read_text_file(path: Path, setting: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PromptError(
            f"{setting}: {path} is not UTF-8 text", "Save the prompt file as UTF-8."
        ) from None
    except OSError as error:
        raise PromptError(f"{setting}: cannot read {path}: {error.strerror}") from None
    if "\x00" in text:
        raise PromptError(
            f"{setting}: {path} is a binary file, not text",
            "Give a text file with one prompt per line (UTF-8).",
        )
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_hub_dataset(
    source: PromptSource, split: str, setting: str, limit: int | None = None
) -> list[str]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        return _read_hub_files(source, split, setting, limit)
    try:
        if Path(source.dataset).is_dir():
            loaded = datasets.load_from_disk(source.dataset)
            table = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            table = datasets.load_dataset(source.dataset, split=split, revision=source.commit)
        return [str(value) for value in table[source.column]]
    except KeyError:
        raise PromptError(
            f"{setting}: dataset {source.dataset} has no column or split '{source.column}'/'{split}'",
            "Set column and split in the prompt table to ones the dataset has.",
        ) from None
    except Exception as error:  # datasets raises many kinds; the user needs the message only
        kind = HubUnreachableError if _is_unreachable(error) else PromptError
        raise kind(
            f"{setting}: cannot load dataset {source.dataset}: {error}",
            "Check the dataset id and your network, or use a local text file (one prompt per line).",
        ) from None


def _read_hub_files(
    source: PromptSource, split: str, setting: str, limit: int | None = None
) -> list[str]:
    """Without `datasets`: fetch the split's data files from the hub and read one column."""
    if Path(source.dataset).expanduser().is_dir():  # not a hub id: only `datasets` reads it
        raise PromptError(
            f"{setting}: {source.dataset} is a folder, not a prompt file",
            "Give a text file with one prompt per line (or a .jsonl/.csv/.parquet file and "
            "its column); a folder saved by datasets' save_to_disk needs `pip install datasets`.",
        )
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import OfflineModeIsEnabled

    unreachable = hub_network_errors()

    try:
        files = HfApi().list_repo_files(source.dataset, repo_type="dataset", revision=source.commit)
    except OfflineModeIsEnabled:
        raise HubUnreachableError(
            f"{setting}: dataset {source.dataset} is on the hub but the hub is offline here",
            "Unset HF_HUB_OFFLINE, or use a local text file (one prompt per line).",
        ) from None
    except unreachable as error:
        raise (HubUnreachableError if _is_unreachable(error) else PromptError)(
            f"{setting}: cannot list dataset {source.dataset}: {error}",
            "Check the dataset id and the network, or use a local text file (one prompt per line).",
        ) from None
    wanted = [
        name
        for name in sorted(files)
        if name.endswith((".parquet", ".json", ".jsonl", ".csv"))
        and (
            re.match(rf"{re.escape(split)}([-_.]|$)", name.rsplit("/", 1)[-1])
            or split in name.split("/")[:-1]
        )
    ]
    if not wanted:
        raise PromptError(
            f"{setting}: dataset {source.dataset} has no data files for split '{split}'",
            "Set split to one the dataset has, or install `datasets` (pip install datasets).",
        )
    if all(name.endswith(".parquet") for name in wanted) and not _has_pyarrow():
        return _read_rows_api(source, split, setting, limit)
    rows: list[str] = []
    for name in wanted:
        try:
            local = Path(
                hf_hub_download(source.dataset, name, repo_type="dataset", revision=source.commit)
            )
        except unreachable as error:
            raise (HubUnreachableError if _is_unreachable(error) else PromptError)(
                f"{setting}: cannot download {name} of dataset {source.dataset}: {error}",
                "Check the network, or use a local text file (one prompt per line).",
            ) from None
        rows += _read_column(local, source.column, setting)
    return rows


def hub_network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when the hub cannot be reached or refuses: its own HTTP
    error, OSError, ValueError, and the errors of its HTTP client (see `_client_errors`)."""
    from huggingface_hub.errors import HfHubHTTPError

    return (HfHubHTTPError, OSError, ValueError, *_client_errors())


def _client_errors() -> tuple[type[BaseException], ...]:
    """The errors of whichever HTTP client huggingface_hub speaks through (httpx, httpx2 in
    huggingface_hub 2.x, requests in older ones): not OSErrors."""
    import importlib

    errors: list[type[BaseException]] = []
    for module, name in (
        ("httpx", "HTTPError"),
        ("httpx2", "HTTPError"),
        ("requests", "RequestException"),
    ):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _is_unreachable(error: BaseException) -> bool:
    """A failure to reach the hub, not an answer from it: offline mode, no connection, a
    timeout, or a server error (5xx); a 4xx answer (no such dataset, no access) is not."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled) or "offline mode" in str(error).lower():
        return True
    try:
        status = getattr(getattr(error, "response", None), "status_code", None)
    except RuntimeError:  # httpx: a request error has no response to show
        status = None
    if isinstance(status, int):
        return status >= 500
    if isinstance(error, HfHubHTTPError):
        return True
    return isinstance(error, (*_client_errors(), ConnectionError, TimeoutError, socket.gaierror))


def _has_pyarrow() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyarrow") is not None


DATASETS_SERVER = "https://datasets-server.huggingface.co/rows"
ROWS_PER_REQUEST = 100  # the most the rows API returns at once


def _read_rows_api(
    source: PromptSource, split: str, setting: str, limit: int | None = None
) -> list[str]:
    """Parquet-only datasets without pyarrow: read the rows from the hub's datasets server.

    Slower than the files (100 rows a request), but needs nothing beyond httpx; a hub token in
    HF_TOKEN is sent for gated datasets.
    """
    import os

    import httpx

    headers = (
        {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get("HF_TOKEN") else {}
    )
    rows: list[str] = []
    offset = 0
    while True:
        try:
            response = httpx.get(
                DATASETS_SERVER,
                params={
                    "dataset": source.dataset,
                    "config": "default",
                    "split": split,
                    "offset": offset,
                    "length": ROWS_PER_REQUEST
                    if limit is None
                    else min(ROWS_PER_REQUEST, limit - offset),
                },
                headers=headers,
                timeout=60,
            )
            response.raise_for_status()
            page = response.json()
        except (httpx.HTTPError, ValueError) as error:
            raise (HubUnreachableError if _is_unreachable(error) else PromptError)(
                f"{setting}: cannot read dataset {source.dataset} from the hub: {error}",
                "pip install datasets (or pyarrow), or use a local text file (one prompt per line).",
            ) from None
        batch = [entry.get("row", {}) for entry in page.get("rows", [])]
        if batch and source.column not in batch[0]:
            raise PromptError(
                f"{setting}: no column '{source.column}' in {source.dataset}",
                f"Set column to one of {sorted(batch[0])}.",
            )
        rows += [str(row[source.column]) for row in batch]
        offset += len(batch)
        if not batch or offset >= int(page.get("num_rows_total", 0)) or offset == limit:
            return rows


def _read_column(path: Path, column: str, setting: str) -> list[str]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet  # type: ignore[import-not-found]
        except ImportError:
            raise PromptError(
                f"{setting}: reading {path.name} needs pyarrow",
                "pip install datasets (or pyarrow), or use a local text file.",
            ) from None
        table = parquet.read_table(path)
        if column not in table.column_names:
            raise PromptError(
                f"{setting}: no column '{column}' in {path.name}",
                f"Set column to one of {table.column_names}.",
            )
        return [str(value) for value in table.column(column).to_pylist()]
    with path.open(encoding="utf-8") as handle:
        if path.suffix == ".csv":
            records = list(csv.DictReader(handle))
        elif path.suffix == ".jsonl":
            records = [json.loads(line) for line in handle if line.strip()]
        else:
            loaded = json.load(handle)
            records = loaded if isinstance(loaded, list) else loaded.get("data", [])
    try:
        return [str(record[column]) for record in records]
    except (KeyError, TypeError):
        raise PromptError(
            f"{setting}: no column '{column}' in {path.name}",
            "Set column in the prompt table to the dataset's text column.",
        ) from None
