"""Every error hctl reports, in one tree.

```
HctlError                      message + hint; exit code 1 unless a subclass says otherwise
                               (defined in the torch-free hctl_worker.errors, the one base
                               class of both halves, and re-exported here)
├── ConfigError                a bad setting, config file or command-line value      (exit 2)
├── ProviderError              the cloud provider (RunPod) said no or could not be reached
│   ├── AuthError              the API key is missing or rejected                     (exit 3)
│   ├── CapacityError          no machine of that GPU type is free right now          (exit 4)
│   ├── UnknownGpuError        a GPU type the provider does not offer                 (exit 2)
│   ├── PodNotFoundError       no pod with that id or name                            (exit 5)
│   ├── PodNotReadyError       a pod did not become reachable in time                 (exit 6)
│   └── ApiError               any other provider failure (retryable flag)
├── RemoteError                reaching a machine over SSH or running a command there
│   ├── ConnectError           network unreachable, refused, timed out                (exit 6)
│   ├── AuthenticationError    the SSH key was not accepted                           (exit 3)
│   ├── HostKeyError           the machine's host key changed since first contact     (exit 7)
│   ├── ConnectionLostError    the connection dropped during a command                (exit 6)
│   ├── TransferError          an upload or download failed or did not verify
│   └── CommandTimeoutError    a remote command ran past its time limit               (exit 124)
├── JobError                   a job on a machine failed, or is not where we looked
│   └── BudgetError            the job would cost, or has cost, more than allowed     (exit 8)
├── Aborted                    the user declined a confirmation                       (exit 130)
└── hctl_worker.errors.WorkerError   the worker's own errors (settings, prompts, model, export)
```

Third-party exceptions (httpx, paramiko, OS errors) are translated into these at the edge where
they enter hctl. Only the command-line layer renders them, as one line of error and one of hint.
"""

from __future__ import annotations

from hctl_worker.errors import HctlError


class ConfigError(HctlError):
    exit_code = 2
    default_hint = "Run `hctl config show` to see the settings in force."


class ProviderError(HctlError):
    """The provider refused a request or could not be reached."""

    retryable: bool = False


class AuthError(ProviderError):
    exit_code = 3
    default_hint = (
        "Create an API key at https://www.runpod.io/console/user/settings, then run "
        "`hctl config set runpod_api_key` (it asks for the key) or export RUNPOD_API_KEY."
    )


class CapacityError(ProviderError):
    exit_code = 4
    default_hint = "Try another GPU type (`hctl gpus` lists what is in stock) or community cloud."


class UnknownGpuError(ProviderError):
    exit_code = 2
    default_hint = "Run `hctl gpus` to list the GPU types and their ids."


class PodNotFoundError(ProviderError):
    exit_code = 5
    default_hint = "Run `hctl list-pods` to see your pods."


class PodNotReadyError(ProviderError):
    exit_code = 6


class ApiError(ProviderError):
    def __init__(self, message: str, hint: str | None = None, *, retryable: bool = False) -> None:
        super().__init__(message, hint)
        self.retryable = retryable


class RemoteError(HctlError):
    """Reaching a machine, or running something on it, failed."""


class ConnectError(RemoteError):
    exit_code = 6


class AuthenticationError(RemoteError):
    exit_code = 3
    default_hint = (
        "Check the SSH key (`hctl doctor`); a key registered after the pod started needs a pod "
        "restart (`hctl stop-pod` then `hctl start-pod`)."
    )


class HostKeyError(RemoteError):
    exit_code = 7


class ConnectionLostError(RemoteError):
    exit_code = 6


class TransferError(RemoteError):
    pass


class JobError(HctlError):
    pass


class BudgetError(JobError):
    exit_code = 8


class Aborted(HctlError):
    exit_code = 130
    default_hint = "Nothing was changed."


class CommandTimeoutError(RemoteError):
    """A remote command ran past its time limit and was interrupted."""

    exit_code = 124
    default_hint = "Give it more time (`--timeout`), or check what the command waits for."
