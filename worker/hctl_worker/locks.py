"""A lock on a file that several worker processes on one machine take turns under.

It is the system's own lock (`flock`; `msvcrt.locking` on Windows) on a small file beside what it
guards: the system releases it when its holder ends, however it ends, so a worker killed while
holding it never blocks the others. One `FileLock` object is held by one thread at a time.
This module is torch-free and optuna-free: the events module (which the controller imports) uses
it too.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import IO

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class FileLock:
    """An exclusive lock on `path` (created when missing, never removed)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._handle: IO[bytes] | None = None
        self._threads = threading.Lock()  # the system lock is per process, not per thread

    def acquire(self) -> bool:
        self._threads.acquire()
        try:
            handle = self.path.open("a+b")
            try:
                _lock(handle)
            except BaseException:
                handle.close()
                raise
        except BaseException:
            self._threads.release()
            raise
        self._handle = handle
        return True

    def release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            _unlock(handle)
        finally:
            handle.close()
            self._threads.release()

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _lock(handle: IO[bytes]) -> None:
    if fcntl is not None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        return
    import msvcrt  # pragma: no cover - Windows

    handle.seek(0)
    while True:  # LK_LOCK gives up after 10 tries; a lock held longer is waited for
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
            return
        except OSError:
            continue


def _unlock(handle: IO[bytes]) -> None:
    if fcntl is not None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return
    import msvcrt  # pragma: no cover - Windows

    handle.seek(0)
    msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
