"""TARGET resolution: from what the user typed to a `Remote` that reaches that machine.

A TARGET is one of:

- `local` — this machine (`LocalRemote`, a subprocess);
- `ssh://USER@HOST[:PORT]` (or `USER@HOST[:PORT]`) — any machine with sshd. It is reached with
  exec channels and SFTP (`DirectRemote`), or through a PTY shell (`ProxyRemote`) when `--pty`
  is given or the address is RunPod's proxy (the `ssh_proxy_host`/`ssh_proxy_port` settings);
- a pod id or name — or nothing, meaning the only running hctl pod. The pod's direct endpoint
  (`root@<public ip>:<port>`) is tried first; when it refuses or does not answer, hctl says so
  and goes through RunPod's proxy (`<pod host id>@ssh.runpod.io`), which always needs a PTY.

Host keys are recorded per machine in hctl's `known_hosts` (see `hctl.remote.hostkeys`): an SSH
address under its `[host]:port`, a pod's direct endpoint under `pod-<id>-<ip>-<port>` (a restarted
pod gets new host keys and a new public port, so it is a new entry, not a "changed key").

Public API (the run orchestration and the CLI use these):

- `resolve_target(text, settings, *, provider=None, pod_id=False, force_pty=False,
  on_message=None) -> Remote` — the one entry point; connects lazily except for a pod's direct
  endpoint, which is probed so the fallback can happen here.
- `open_target(text, settings, ...) -> (Remote, Pod | None)` — the same, plus the pod (if any).
- `parse_target(text) -> Target` — pure parsing, no network.
- `connect_address(address, settings, ...)` / `connect_pod(pod, settings, ...)` — the two halves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel

from hctl.errors import ConfigError, ConnectError, PodNotReadyError
from hctl.providers.base import Pod, PodStatus, Provider, SshEndpoint
from hctl.remote.base import Remote
from hctl.remote.direct import DEFAULT_ENVIRONMENT_FILE, DirectRemote
from hctl.remote.hostkeys import KnownHosts, host_key_name
from hctl.remote.local import LocalRemote
from hctl.remote.proxy import ProxyRemote
from hctl.remote.ssh import SshAddress, SshConnection
from hctl.remote.ssh_config import HostEntry
from hctl.settings import Settings

MessageCallback = Callable[[str], None]


def _ignore(_message: str) -> None:
    pass


class Target(BaseModel):
    """What a TARGET argument names, before anything is contacted."""

    kind: Literal["local", "ssh", "pod"]
    address: SshAddress | None = None  # kind "ssh"
    pod_ref: str | None = None  # kind "pod": an id or a name; None means "the only running pod"


def parse_target(text: str | None) -> Target:
    """Classify a TARGET argument (see the module docstring)."""
    if text is None or not text.strip():
        return Target(kind="pod")
    text = text.strip()
    if text == "local":
        return Target(kind="local")
    if text.startswith("ssh://") or "@" in text:
        return Target(kind="ssh", address=SshAddress.parse(text))
    if "://" in text:
        raise ConfigError(
            f"Unknown kind of target: {text!r}",
            "A target is a pod id or name, ssh://USER@HOST:PORT, or `local`.",
        )
    return Target(kind="pod", pod_ref=text)


def is_proxy(address: SshAddress, settings: Settings) -> bool:
    """Whether `address` is RunPod's SSH proxy, which only takes PTY sessions."""
    return address.host == settings.ssh_proxy_host and address.port == settings.ssh_proxy_port


def _connection(
    endpoint: SshAddress,
    settings: Settings,
    *,
    host_key_name: str | None = None,
    attempts: int = 3,
    on_message: MessageCallback,
) -> SshConnection:
    return SshConnection(
        endpoint,
        key_path=settings.ssh_key_path,
        known_hosts=KnownHosts(),
        host_key_name=host_key_name,
        connect_timeout=settings.connect_timeout_s,
        attempts=attempts,
        on_message=on_message,
    )


def connect_address(
    address: SshAddress,
    settings: Settings,
    *,
    force_pty: bool = False,
    environment_file: str | None = DEFAULT_ENVIRONMENT_FILE,
    on_message: MessageCallback = _ignore,
) -> Remote:
    """A Remote for an SSH address: PTY shell for the proxy (or `--pty`), exec + SFTP otherwise."""
    connection = _connection(address, settings, on_message=on_message)
    if force_pty or is_proxy(address, settings):
        return ProxyRemote(connection, environment_file=environment_file)
    return DirectRemote(connection, environment_file=environment_file)


def pod_host_key_name(pod: Pod, endpoint: SshEndpoint) -> str:
    return f"pod-{pod.id}-{endpoint.host}-{endpoint.port}"


def connect_pod(
    pod: Pod,
    settings: Settings,
    *,
    force_pty: bool = False,
    environment_file: str | None = DEFAULT_ENVIRONMENT_FILE,
    on_message: MessageCallback = _ignore,
) -> Remote:
    """A Remote for a running pod: its direct endpoint when that answers, else RunPod's proxy."""
    if pod.status == PodStatus.STARTING:
        raise PodNotReadyError(
            f"Pod {pod.id} ({pod.name}) is still starting.",
            "Wait a minute and try again; `hctl list-pods` shows when it is ready.",
        )
    if pod.status != PodStatus.RUNNING:
        raise PodNotReadyError(
            f"Pod {pod.id} ({pod.name}) is {pod.status}, not running.",
            f"Start it with `hctl start-pod {pod.id}`.",
        )
    direct = pod.endpoint("direct")
    proxy = pod.endpoint("proxy")
    if direct is None and proxy is None:
        raise PodNotReadyError(
            f"Pod {pod.id} has no SSH endpoint yet (its container is still starting).",
            "Wait a minute and try again; `hctl list-pods` shows when it is ready.",
        )
    if direct is not None and not force_pty:
        address = SshAddress(user=direct.user, host=direct.host, port=direct.port)
        connection = _connection(
            address,
            settings,
            host_key_name=pod_host_key_name(pod, direct),
            attempts=1 if proxy is not None else 3,
            on_message=on_message,
        )
        try:
            connection.transport()
        except ConnectError as error:
            if proxy is None:
                raise
            on_message(
                f"note: direct SSH to pod {pod.id} ({direct.host}:{direct.port}) failed "
                f"({error.message}); using RunPod's SSH proxy instead."
            )
        else:
            # A reconnect later may take its time: the pod is known to answer on this path.
            connection.attempts = 3
            return DirectRemote(
                connection,
                description=f"pod {pod.id} (direct {direct.host}:{direct.port})",
                environment_file=environment_file,
            )
    if proxy is None:
        raise PodNotReadyError(
            f"Pod {pod.id} has no proxy endpoint, and --pty needs one.",
            "Drop --pty to use its direct endpoint.",
        )
    address = SshAddress(user=proxy.user, host=proxy.host, port=proxy.port)
    return ProxyRemote(
        _connection(address, settings, on_message=on_message),
        description=f"pod {pod.id} (proxy {proxy.user}@{proxy.host})",
        environment_file=environment_file,
    )


def resolve_pod_target(
    text: str | None, settings: Settings, provider: Provider | None = None
) -> Pod | None:
    """The pod a TARGET names, or None when the target is an SSH address or `local`."""
    target = parse_target(text)
    if target.kind != "pod":
        return None
    from hctl.pods import resolve_pod

    if provider is None:
        from hctl.providers import make_provider

        provider = make_provider(settings)
    return resolve_pod(provider, target.pod_ref)


def open_target(
    text: str | None,
    settings: Settings,
    *,
    provider: Provider | None = None,
    force_pty: bool = False,
    environment_file: str | None = DEFAULT_ENVIRONMENT_FILE,
    on_message: MessageCallback = _ignore,
) -> tuple[Remote, Pod | None]:
    """Like `resolve_target`, and also the pod when the target is one (for its cost, its id)."""
    pod = resolve_pod_target(text, settings, provider)
    if pod is None:
        remote = resolve_target(
            text,
            settings,
            force_pty=force_pty,
            environment_file=environment_file,
            on_message=on_message,
        )
        return remote, None
    remote = connect_pod(
        pod, settings, force_pty=force_pty, environment_file=environment_file, on_message=on_message
    )
    return remote, pod


def resolve_target(
    text: str | None,
    settings: Settings,
    *,
    provider: Provider | None = None,
    pod_id: bool = False,
    force_pty: bool = False,
    environment_file: str | None = DEFAULT_ENVIRONMENT_FILE,
    on_message: MessageCallback = _ignore,
) -> Remote:
    """The Remote for a TARGET (see the module docstring).

    `pod_id=True` says `text` is a pod id, never an address (for job records).
    """
    target = Target(kind="pod", pod_ref=text) if pod_id else parse_target(text)
    if target.kind == "local":
        return LocalRemote()
    if target.kind == "ssh":
        assert target.address is not None
        return connect_address(
            target.address,
            settings,
            force_pty=force_pty,
            environment_file=environment_file,
            on_message=on_message,
        )
    pod = resolve_pod_target(target.pod_ref or None, settings, provider)
    assert pod is not None
    return connect_pod(
        pod,
        settings,
        force_pty=force_pty,
        environment_file=environment_file,
        on_message=on_message,
    )


def host_entry_for(
    text: str | None,
    settings: Settings,
    *,
    alias: str | None = None,
    provider: Provider | None = None,
    on_message: MessageCallback = _ignore,
) -> HostEntry:
    """The ~/.ssh/config entry for a TARGET: a pod's direct endpoint when it answers.

    A pod is contacted once, so its host key is recorded (and checked) by hctl first; plain ssh
    then trusts exactly that key through `HostKeyAlias`.
    """
    target = parse_target(text)
    known_hosts = KnownHosts().path
    if target.kind == "local":
        raise ConfigError("`local` needs no SSH entry.", "Give a pod or an ssh:// address.")
    if target.kind == "ssh":
        assert target.address is not None
        address = target.address
        # Contact it once, so its host key is recorded (or checked) and plain ssh can insist on it.
        connection = _connection(address, settings, on_message=on_message)
        connection.transport()
        connection.close()
        return HostEntry(
            alias=alias or f"hctl-{address.host}-{address.port}",
            host=address.host,
            port=address.port,
            user=address.user,
            key_path=settings.ssh_key_path,
            known_hosts=known_hosts,
            host_key_alias=None,
            strict=True,
            request_tty=is_proxy(address, settings),
        )
    pod = resolve_pod_target(target.pod_ref or None, settings, provider)
    assert pod is not None
    remote = connect_pod(pod, settings, on_message=on_message)
    remote.close()
    endpoint = pod.endpoint("direct") if remote.kind == "direct" else pod.endpoint("proxy")
    assert endpoint is not None
    return HostEntry(
        alias=alias or (pod.name if pod.name.startswith("hctl-") else f"hctl-{pod.name}"),
        host=endpoint.host,
        port=endpoint.port,
        user=endpoint.user,
        key_path=settings.ssh_key_path,
        known_hosts=known_hosts,
        strict=True,
        host_key_alias=pod_host_key_name(pod, endpoint)
        if remote.kind == "direct"
        else host_key_name(endpoint.host, endpoint.port),
        request_tty=remote.kind == "proxy",
    )
