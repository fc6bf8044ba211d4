"""Every error the worker expects, in one tree.

The tree hangs from `hctl.errors.HctlError` (message, hint, exit code), the one base class of
both halves, so an error the controller meets while reading worker settings renders like its own.

```
WorkerError                  message + hint; exit code 1 unless a subclass says otherwise
├── SettingsError            an unknown setting, a value out of range, a bad config file   (exit 2)
├── PromptError              a prompt source that is missing, empty or unreadable          (exit 2)
├── ModelLoadError           a model that cannot be found or loaded                        (exit 3)
│   └── NoChatTemplateError  a tokenizer without a chat template                           (exit 3)
├── OutOfMemoryError         the GPU (or CPU) ran out of memory                            (exit 4)
├── JobDirectoryError        a job directory that cannot be used                           (exit 2)
└── ExportError              saving or uploading the chosen model failed                   (exit 5)
```

torch, transformers and huggingface_hub exceptions are translated into these where they enter
the worker; the CLI prints them as one line of error and one of hint, and writes an `error` event.
"""

from __future__ import annotations

from hctl.errors import HctlError


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


class ExportError(WorkerError):
    exit_code = 5
