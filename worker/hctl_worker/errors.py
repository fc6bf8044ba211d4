"""Every error the worker expects, in one tree, and the base class of both halves' errors.

`HctlError` (message, hint, exit code) is defined here, torch-free, and is the one base class of
the worker's errors and of the controller's (`hctl.errors` re-exports it and hangs its own tree
from it), so an error the controller meets while reading worker settings renders like its own.

```
HctlError                        message + hint; exit code 1 unless a subclass says otherwise
├── (the controller's errors: see hctl.errors)
└── WorkerError                  the worker's own errors
    ├── SettingsError            an unknown setting, a value out of range, a bad config file (exit 2)
    ├── PromptError              a prompt source that is missing, empty or unreadable        (exit 2)
    ├── ModelLoadError           a model that cannot be found or loaded                      (exit 3)
    │   └── NoChatTemplateError  a tokenizer without a chat template                         (exit 3)
    ├── OutOfMemoryError         the GPU (or CPU) ran out of memory                          (exit 4)
    ├── JobDirectoryError        a job directory that cannot be used                         (exit 2)
    │   └── DiskError            a write refused: the disk is full, read-only or not ours    (exit 2)
    ├── ExportError              saving or uploading the chosen model failed                 (exit 5)
    └── StorageError             the study's database cannot be reached or used              (exit 6)
```

torch, transformers and huggingface_hub exceptions are translated into these where they enter
the worker; a write the system refuses can happen at any file, so `disk_error` translates those
for the CLI; the CLI prints them as one line of error and one of hint, and writes an `error` event.
"""

from __future__ import annotations

import errno


class HctlError(Exception):
    """The base of every error hctl expects; carries what happened and what to do next."""

    exit_code: int = 1
    default_hint: str = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return self.message


class WorkerError(HctlError):
    """The base of the worker's errors."""


class SettingsError(WorkerError):
    exit_code = 2
    default_hint = "See config.default.toml for every setting, its meaning and its range."


class PromptError(WorkerError):
    exit_code = 2


class ModelLoadError(WorkerError):
    exit_code = 3


class NoChatTemplateError(ModelLoadError):
    default_hint = (
        "Use an instruction-tuned (chat) model, or give the tokenizer a chat template "
        "(tokenizer.chat_template) before abliterating it."
    )


class OutOfMemoryError(WorkerError):
    exit_code = 4
    default_hint = (
        "Lower max_batch_size (or set batch_size), free the GPU (`hctl gpu-free`), or use a "
        "GPU with more memory."
    )


class JobDirectoryError(WorkerError):
    exit_code = 2


class DiskError(JobDirectoryError):
    """A write the system refused (see `disk_error`)."""


# What the system says when it refuses a write, and what to do about it.
_RUN_AGAIN = (
    "then run the same command again: a search continues where it stopped, its trials so far "
    "are kept."
)
_REFUSED_WRITES = {
    errno.ENOSPC: (
        "no space left on the disk",
        f"Free space on that volume (or use a bigger one), {_RUN_AGAIN}",
    ),
    errno.EDQUOT: ("the disk quota is used up", f"Free space within the quota, {_RUN_AGAIN}"),
    errno.EFBIG: (
        "the file grew past the largest size this system allows it",
        f"Raise the limit (ulimit -f), or free space, {_RUN_AGAIN}",
    ),
    errno.EROFS: (
        "the file system is read-only",
        "Give a --job-dir (or save directory) on a writable volume; copy a finished job there "
        "to export it. `pareto` and `trials` only read.",
    ),
    errno.EACCES: (
        "permission denied",
        "Give a folder this user may write to, or change its permissions.",
    ),
    errno.EPERM: (
        "operation not permitted",
        "Give a folder this user may write to, or change its permissions.",
    ),
}


def disk_error(error: OSError, folder: object = None) -> DiskError | None:
    """A write the system refused (full disk, quota, read-only, permissions) as a DiskError
    naming the file (else the `folder` it was written in); None for any other OSError."""
    known = _REFUSED_WRITES.get(error.errno or 0)
    if known is None:
        return None
    what, hint = known
    where = error.filename or folder
    return DiskError(f"cannot write{f' {where}' if where else ''}: {what}", hint)


class ExportError(WorkerError):
    exit_code = 5


class StorageError(WorkerError):
    exit_code = 6
