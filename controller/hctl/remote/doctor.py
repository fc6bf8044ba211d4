"""`hctl doctor`: check everything hctl needs, and say how to fix what is wrong.

Replaces the old `runpod.ps1 check-tools`. The checks, in order: the SSH key (present, private to
its owner, readable without a passphrase), the RunPod API key (set, accepted), the API
(reachable), and every running pod over each of its SSH paths (proxy and direct). Each check is a
`Check` with its fix; nothing here renders or exits.
"""

from __future__ import annotations

import stat
import sys
from collections.abc import Callable

from pydantic import BaseModel

from hctl.errors import AuthError, HctlError, ProviderError
from hctl.providers.base import Pod, PodStatus, Provider
from hctl.remote.direct import DirectRemote
from hctl.remote.proxy import ProxyRemote
from hctl.remote.ssh import SshAddress, load_private_key
from hctl.settings import Settings


class Check(BaseModel):
    name: str
    ok: bool
    detail: str = ""
    fix: str = ""


def check_ssh_key(settings: Settings) -> list[Check]:
    path = settings.ssh_key_path
    if not path.exists():
        return [
            Check(
                name="SSH key",
                ok=False,
                detail=f"no key at {path}",
                fix="Run `hctl ssh-key` (it makes one and registers it with RunPod).",
            )
        ]
    checks = []
    if sys.platform != "win32":
        mode = stat.S_IMODE(path.stat().st_mode)
        checks.append(
            Check(
                name="SSH key permissions",
                ok=not mode & 0o077,
                detail=f"{path} has mode {mode:o}",
                fix=f"chmod 600 {path}",
            )
        )
    try:
        load_private_key(path)
        checks.insert(0, Check(name="SSH key", ok=True, detail=str(path)))
    except HctlError as error:
        checks.insert(0, Check(name="SSH key", ok=False, detail=error.message, fix=error.hint))
    return checks


def check_api(
    settings: Settings, provider_factory: Callable[[], Provider]
) -> tuple[list[Check], list[Pod]]:
    if settings.runpod_api_key is None:
        return [
            Check(
                name="RunPod API key",
                ok=False,
                detail="not set",
                fix="Run `hctl config set runpod_api_key` or export RUNPOD_API_KEY.",
            )
        ], []
    try:
        pods = provider_factory().list()
    except AuthError as error:
        return [Check(name="RunPod API key", ok=False, detail=error.message, fix=error.hint)], []
    except ProviderError as error:
        return [
            Check(name="RunPod API key", ok=True, detail="set"),
            Check(
                name="RunPod API",
                ok=False,
                detail=error.message,
                fix=error.hint or f"Check your network and {settings.runpod_api_url}.",
            ),
        ], []
    return [
        Check(name="RunPod API key", ok=True, detail="accepted"),
        Check(name="RunPod API", ok=True, detail=f"reachable; {len(pods)} pod(s)"),
    ], pods


def check_pod(pod: Pod, settings: Settings, *, environment_file: str | None = None) -> list[Check]:
    """Reach the pod over each of its SSH paths with a trivial command."""
    from hctl.targets import _connection, pod_host_key_name

    checks = []
    for kind in ("proxy", "direct"):
        endpoint = pod.endpoint(kind)  # type: ignore[arg-type]
        name = f"pod {pod.id} ({pod.name}) via {kind}"
        if endpoint is None:
            checks.append(
                Check(
                    name=name,
                    ok=kind == "direct",  # a pod without a public 22/tcp port is fine
                    detail="no endpoint" + (" (no public 22/tcp port)" if kind == "direct" else ""),
                    fix="" if kind == "direct" else "Wait until the pod has started.",
                )
            )
            continue
        address = SshAddress(user=endpoint.user, host=endpoint.host, port=endpoint.port)
        host_key = pod_host_key_name(pod, endpoint) if kind == "direct" else None
        connection = _connection(
            address, settings, host_key_name=host_key, attempts=1, on_message=lambda _m: None
        )
        remote_class = ProxyRemote if kind == "proxy" else DirectRemote
        options = {} if environment_file is None else {"environment_file": environment_file}
        remote = remote_class(connection, **options)
        try:
            result = remote.run("true", timeout=30)
            ok = result.exit_code == 0
            checks.append(
                Check(
                    name=name,
                    ok=ok,
                    detail=f"{endpoint.user}@{endpoint.host}:{endpoint.port}",
                    fix="" if ok else "The shell answered with an error; try `hctl connect`.",
                )
            )
        except HctlError as error:
            checks.append(Check(name=name, ok=False, detail=error.message, fix=error.hint))
        finally:
            remote.close()
    return checks


def run_doctor(settings: Settings, provider_factory: Callable[[], Provider]) -> list[Check]:
    checks = check_ssh_key(settings)
    api_checks, pods = check_api(settings, provider_factory)
    checks.extend(api_checks)
    key_ok = all(check.ok for check in checks if check.name == "SSH key")
    for pod in pods:
        if pod.status != PodStatus.RUNNING:
            continue
        if not key_ok:
            checks.append(
                Check(name=f"pod {pod.id}", ok=False, detail="skipped: no usable SSH key")
            )
            continue
        checks.extend(check_pod(pod, settings))
    return checks
