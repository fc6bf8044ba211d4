"""A wheel of this very controller, to install the worker on a machine (`setup.ensure_worker`).

Built from a developer checkout or an installed wheel alike, by assembling the installed `hctl`
and `hctl_worker` package files with the distribution's metadata: nothing needs to be published
first. The wheel carries a build id (a hash of its files), so a changed checkout at the same
version is noticed on the machine and reinstalled.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import zipfile
from pathlib import Path

import hctl
from hctl.settings import hctl_home

BUILD_ID_FILE = "hctl_build_id"  # in the wheel's dist-info: the build id it was made from


def _package_files() -> list[tuple[str, Path]]:
    """(path inside the wheel, file on disk) for every file of `hctl` and `hctl_worker`."""
    import hctl_worker

    files = []
    for package in (hctl, hctl_worker):
        root = Path(package.__file__).resolve().parent
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.append((f"{root.name}/{path.relative_to(root).as_posix()}", path))
    return files


def build_id() -> str:
    """A hash of the controller's and worker's files: changes with any edit of the code."""
    digest = hashlib.sha256()
    for name, path in _package_files():
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _entry_points_text(distribution: importlib.metadata.Distribution) -> str:
    groups: dict[str, list[str]] = {}
    for entry in distribution.entry_points:
        groups.setdefault(entry.group, []).append(f"{entry.name} = {entry.value}")
    return "".join(
        f"[{group}]\n" + "\n".join(lines) + "\n\n" for group, lines in sorted(groups.items())
    )


def build_wheel(destination: Path | None = None) -> Path:
    """A wheel of this controller's exact files (cached by build id); returns its path."""
    distribution = importlib.metadata.distribution("hctl")
    version = hctl.__version__
    identity = build_id()
    folder = destination if destination is not None else hctl_home() / "wheels" / identity
    wheel = folder / f"hctl-{version}-py3-none-any.whl"
    if wheel.exists():
        return wheel
    folder.mkdir(parents=True, exist_ok=True)
    dist_info = f"hctl-{version}.dist-info"
    metadata = distribution.metadata.as_string()  # type: ignore[attr-defined]
    generated = {
        f"{dist_info}/METADATA": metadata.encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: hctl-setup\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        f"{dist_info}/entry_points.txt": _entry_points_text(distribution).encode(),
        f"{dist_info}/top_level.txt": b"hctl\nhctl_worker\n",
        f"{dist_info}/{BUILD_ID_FILE}": identity.encode() + b"\n",
    }
    records = []
    partial = wheel.with_suffix(".part")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        entries = [(name, path.read_bytes()) for name, path in _package_files()]
        for name, data in [*entries, *generated.items()]:
            archive.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            records.append(f"{name},sha256={digest.decode()},{len(data)}")
        records.append(f"{dist_info}/RECORD,,")
        archive.writestr(f"{dist_info}/RECORD", "\n".join(records) + "\n")
    partial.replace(wheel)
    return wheel
