"""A file of whole lines that workers append to: the events file and the study's journal.

Readers of these files (the controller by byte offset, Optuna's journal reader, a resumed worker)
take a line without its newline for one still being written. A write that fails half way (the
disk is full, the volume went away) leaves such a fragment for good, and the next line appended
after it merges with it: one line neither reader can parse, and a job that cannot resume. So an
append cuts a fragment left at the end of the file before it writes, and cuts its own when its
write fails: the file only ever holds whole lines, and a failed append loses that line alone.

The caller holds the file's lock (`locks.FileLock`) around an append. Torch-free: the events
module, which the controller imports, uses it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

_CHUNK = 4096  # bytes read at a time, backwards, to find the last whole line


def append_lines(path: Path, data: bytes) -> int:
    """Append `data` (one or more lines, each ending in a newline) to `path` and sync it;
    returns the file's size afterwards. OSError as the system raised it, with the file as it was
    before (less any fragment an earlier failed append left)."""
    with path.open("a+b", buffering=0) as handle:
        whole = _end_of_whole_lines(handle)
        if whole != handle.seek(0, os.SEEK_END):
            handle.truncate(whole)
        try:
            view = memoryview(data)
            while view:
                view = view[handle.write(view) :]
            os.fsync(handle.fileno())
        except OSError as error:
            with contextlib.suppress(OSError):  # cutting only frees space; keep the first error
                handle.truncate(whole)
            error.filename = error.filename or str(path)
            raise
        return whole + len(data)


def _end_of_whole_lines(handle) -> int:
    """The size of the file up to and including its last newline (0 when it has none)."""
    position = handle.seek(0, os.SEEK_END)
    while position > 0:
        start = max(0, position - _CHUNK)
        handle.seek(start)
        newline = handle.read(position - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


__all__ = ["append_lines"]
