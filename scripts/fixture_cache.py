"""The cache of built test models: outside git, keyed by their recipe, safe to build into at once.

A model that is too big to commit (scripts/make_real_refuser.py) is built on first use into
`$HCTL_FIXTURE_CACHE`, else ~/.cache/hctl/fixtures. Its folder name carries a hash of what it is
built from, so a changed recipe builds a new folder and an old one is never reused by mistake.
Builders hold an exclusive lock while they build, work in a staging folder inside the cache,
and move each finished folder into place with one rename: a reader sees a whole folder or none,
and a builder that dies leaves nothing that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "HCTL_FIXTURE_CACHE"


def cache_root() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "hctl" / "fixtures"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Held by one process at a time (the others wait); released when the block exits, and by
    the operating system if the process dies."""
    with path.open("a+b") as handle:
        if os.name == "nt":
            import msvcrt

            handle.seek(0)
            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:  # LK_LOCK gives up after ten seconds; keep waiting
                    continue
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def staging_folder(root: Path) -> Iterator[Path]:
    """An empty folder inside the cache (same file system, so publishing is one rename),
    removed with whatever is left in it."""
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(built: Path, final: Path) -> None:
    """Move a finished folder into place in one rename (readers never see half a folder)."""
    if final.exists():  # unfinished: left by a build that died between its renames
        shutil.rmtree(final)
    os.replace(built, final)


__all__ = [
    "CACHE_ENV",
    "cache_root",
    "exclusive_lock",
    "file_digest",
    "publish",
    "staging_folder",
]
