"""Files a job needs on its machine: the model and prompt files the settings name (uploaded
once, under `<base>/models/` and `<base>/data/`), text through private temporary files, and the
secrets file the workers read (0600) before it is deleted.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import tempfile
from pathlib import Path
from typing import Any

from hctl.remote.base import Remote
from hctl.services.job_protocol import SECRETS_FILE
from hctl_worker.settings import PROMPT_TABLES


def upload_folder(remote: Remote, local: Path, remote_dir: str) -> None:
    """Upload a folder's files (recursively); a finished upload is marked and not repeated."""
    marker = f"{remote_dir}/.hctl-complete"
    if remote.run(f"test -f {shlex.quote(marker)}", timeout=30).exit_code == 0:
        return
    files = sorted(path for path in local.rglob("*") if path.is_file())
    folders = sorted({str(Path(remote_dir, path.relative_to(local).parent)) for path in files})
    remote.run("mkdir -p " + " ".join(shlex.quote(folder) for folder in folders), timeout=60)
    for path in files:
        remote.put(path, f"{remote_dir}/{path.relative_to(local).as_posix()}")
    remote.run(f"touch {shlex.quote(marker)}", timeout=30)


def content_tag(path: Path) -> str:
    """A short tag of a file or folder's names and sizes, to name its copy on the machine."""
    digest = hashlib.sha256()
    items = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for item in items:
        digest.update(f"{item.relative_to(path.parent)}:{item.stat().st_size}".encode())
    return digest.hexdigest()[:10]


def place_inputs(
    settings: dict[str, Any], remote: Remote, base_dir: str, *, local_machine: bool
) -> dict[str, Any]:
    """Make the model and prompt files the settings name available on the machine.

    On this machine local paths only become absolute; elsewhere they are uploaded (once) under
    `<base>/models/` and `<base>/data/` and the settings point at the copies.
    """
    placed = dict(settings)
    model = Path(str(placed["model"])).expanduser()
    if model.is_dir():
        if local_machine:
            placed["model"] = str(model.resolve())
        else:
            target = f"{base_dir}/models/{model.resolve().name}-{content_tag(model)}"
            upload_folder(remote, model, target)
            placed["model"] = target
    for key in PROMPT_TABLES:
        table = placed.get(key)
        if not isinstance(table, dict) or "dataset" not in table:
            continue
        source = Path(str(table["dataset"])).expanduser()
        if not source.exists():
            continue  # a hub dataset id
        table = dict(table)
        if local_machine:
            table["dataset"] = str(source.resolve())
        elif source.is_dir():
            target = f"{base_dir}/data/{source.resolve().name}-{content_tag(source)}"
            upload_folder(remote, source, target)
            table["dataset"] = target
        else:
            target_dir = f"{base_dir}/data/{content_tag(source)}"
            remote.run(f"mkdir -p {shlex.quote(target_dir)}", timeout=30)
            target = f"{target_dir}/{source.name}"
            remote.put(source, target)
            table["dataset"] = target
        placed[key] = table
    return placed


def put_text(remote: Remote, text: str, remote_path: str) -> None:
    """Upload text through a private temporary file."""
    descriptor, name = tempfile.mkstemp(prefix="hctl-")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        remote.put(Path(name), remote_path)
    finally:
        Path(name).unlink(missing_ok=True)


def secrets_env(values: dict[str, str | None]) -> str:
    return "".join(
        f"export {name}={shlex.quote(value)}\n" for name, value in values.items() if value
    )


def upload_secrets(remote: Remote, job_dir: str, values: dict[str, str | None]) -> None:
    text = secrets_env(values)
    if text:
        upload_private(remote, text, f"{job_dir}/{SECRETS_FILE}")


def upload_private(remote: Remote, text: str, path: str) -> None:
    """A file only its owner may read (0600), inside a job directory (0700: nobody else can see
    it in the moment before the chmod)."""
    put_text(remote, text, path)
    remote.run(f"chmod 600 {shlex.quote(path)}", timeout=30)
