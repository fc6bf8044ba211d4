"""One SSH connection with paramiko: key, host-key check, keepalives, reconnects, error translation.

`SshConnection` is shared by both SSH remotes (`direct` and `proxy`). It connects lazily, checks
the server's host key against `KnownHosts` (recording it on first contact), authenticates with the
key file from the settings, and reconnects with backoff when asked for a transport after a drop.
Every paramiko or socket error leaves this module as an `hctl.errors.RemoteError` subclass.
"""

from __future__ import annotations

import contextlib
import socket
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import paramiko
from pydantic import BaseModel

from hctl.errors import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    ConnectionLostError,
    HostKeyError,
    RemoteError,
)
from hctl.remote.hostkeys import KnownHosts, host_key_name

PTY_REFUSAL = "doesn't support PTY"
CONTAINER_NOT_FOUND = "container not found"

Sleeper = Callable[[float], None]
MessageCallback = Callable[[str], None]


def _ignore(_message: str) -> None:
    pass


class SshAddress(BaseModel):
    """`ssh://user@host:port`."""

    user: str
    host: str
    port: int = 22

    @classmethod
    def parse(cls, text: str) -> SshAddress:
        """Parse `ssh://user@host[:port]` (the scheme is optional); ConfigError when malformed."""
        candidate = text if "://" in text else f"ssh://{text}"
        try:
            parts = urlsplit(candidate)
            port = parts.port or 22
        except ValueError:
            parts, port = None, 0
        if parts is None or parts.scheme != "ssh" or not parts.hostname or not parts.username:
            raise ConfigError(
                f"Not an SSH address: {text!r}",
                "Write it as ssh://USER@HOST:PORT, e.g. ssh://root@203.0.113.7:22.",
            )
        return cls(user=parts.username, host=parts.hostname, port=port)

    def __str__(self) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}"


def load_private_key(path: Path, *, on_message: MessageCallback = _ignore) -> paramiko.PKey:
    """The private key at `path`; a missing, unreadable or encrypted key is a clear error."""
    if not path.exists():
        raise ConfigError(
            f"No SSH key at {path}.",
            "Run `hctl ssh-key` to create one (and register it with RunPod), or set ssh_key "
            "(`hctl config set ssh_key PATH`).",
        )
    if sys.platform != "win32":
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            on_message(
                f"note: {path} is readable by other users (mode {mode:o}); plain ssh refuses such "
                f"a key. Fix it with `chmod 600 {path}`."
            )
    try:
        return paramiko.PKey.from_path(path)
    except paramiko.PasswordRequiredException:
        raise AuthenticationError(
            f"The SSH key {path} is protected by a passphrase.",
            "hctl needs a key without a passphrase: run `hctl ssh-key` to create one for hctl.",
        ) from None
    except (paramiko.SSHException, ValueError, OSError) as error:
        raise ConfigError(
            f"Cannot read the SSH key {path}: {error}",
            "Point ssh_key at an OpenSSH private key, or run `hctl ssh-key` to create one.",
        ) from None


def connect_error(address: SshAddress, error: BaseException) -> RemoteError:
    """Translate an error raised while connecting to `address`."""
    where = f"{address.host}:{address.port}"
    if isinstance(error, RemoteError):
        return error
    if isinstance(error, ConnectionRefusedError):
        return ConnectError(
            f"Connection refused by {where}.",
            "Nothing listens there yet: a pod's sshd may still be starting, and RunPod's direct TCP "
            "ports are often unreliable. Wait a minute, or use the proxy (`--pty`, or the pod id).",
        )
    if isinstance(error, (socket.timeout, TimeoutError)):
        return ConnectError(
            f"Timed out connecting to {where}.",
            "Check the address and your network; a pod may still be starting (`hctl list-pods`).",
        )
    if isinstance(error, socket.gaierror):
        return ConnectError(f"Cannot resolve {address.host}: {error}", "Check the host name.")
    if isinstance(error, paramiko.AuthenticationException):
        return AuthenticationError(f"{address.user}@{where} did not accept the SSH key.")
    if isinstance(error, (paramiko.SSHException, EOFError)):
        return ConnectError(
            f"{where} did not complete an SSH handshake: {error or type(error).__name__}",
            "The machine may still be starting; try again in a minute.",
        )
    if isinstance(error, OSError):
        return ConnectError(
            f"Cannot reach {where}: {error.strerror or error}",
            "Check the address and your network connection.",
        )
    return ConnectError(f"Cannot connect to {where}: {error}")


def lost_error(description: str, error: BaseException | None = None) -> ConnectionLostError:
    detail = f" ({error})" if error and str(error) else ""
    return ConnectionLostError(
        f"The connection to {description} was lost{detail}.",
        "The next command reconnects; a job on the machine keeps running "
        "(`hctl exec` again, or re-attach to the job).",
    )


class SshConnection:
    """A lazily opened, self-healing paramiko transport to one address."""

    def __init__(
        self,
        address: SshAddress,
        *,
        key_path: Path,
        known_hosts: KnownHosts | None = None,
        host_key_name: str | None = None,
        connect_timeout: float = 15.0,
        keepalive_s: int = 15,
        attempts: int = 3,
        backoff_s: float = 1.0,
        sleep: Sleeper = time.sleep,
        on_message: MessageCallback = _ignore,
    ) -> None:
        self.address = address
        self.key_path = key_path
        self.known_hosts = known_hosts if known_hosts is not None else KnownHosts()
        self.host_key_name = host_key_name or _default_name(address)
        self.connect_timeout = connect_timeout
        self.keepalive_s = keepalive_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.sleep = sleep
        self.on_message = on_message
        self._transport: paramiko.Transport | None = None
        self._key: paramiko.PKey | None = None
        self.connects = 0  # how many times a transport was opened (tests and messages use it)

    def transport(self) -> paramiko.Transport:
        """The live transport, reconnecting (with backoff) when there is none."""
        if self._transport is not None and self._transport.is_active():
            return self._transport
        if self._transport is not None:
            self.on_message(f"Reconnecting to {self.address.host}:{self.address.port}...")
            self.drop()
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                self._transport = self._connect_once()
                self.connects += 1
                return self._transport
            except ConnectError:
                if attempt == self.attempts:
                    raise
                self.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # the loop returns or raises

    def transport_alive(self) -> bool:
        return self._transport is not None and self._transport.is_active()

    def open_session(self) -> paramiko.Channel:
        transport = self.transport()
        try:
            return transport.open_session(timeout=self.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError) as error:
            self.drop()
            message = str(error)
            if "administratively prohibited" in message or "open failed" in message.lower():
                raise ConnectError(
                    f"{self.address.host}:{self.address.port} refused to open a session: {error}"
                ) from None
            raise lost_error(str(self.address), error) from None

    def _connect_once(self) -> paramiko.Transport:
        if self._key is None:
            self._key = load_private_key(self.key_path, on_message=self.on_message)
        try:
            sock = socket.create_connection(
                (self.address.host, self.address.port), timeout=self.connect_timeout
            )
        except OSError as error:
            raise connect_error(self.address, error) from None
        _enable_tcp_keepalive(sock)
        transport = paramiko.Transport(sock)
        try:
            recorded = self.known_hosts.key_types(self.host_key_name)
            if recorded:
                # Ask for a key type we have on record, so a server offering several types is
                # not mistaken for a changed one.
                options = transport.get_security_options()
                preferred = [kind for kind in options.key_types if kind in recorded]
                if preferred:
                    options.key_types = preferred
            transport.start_client(timeout=self.connect_timeout)
            self.known_hosts.check(
                self.host_key_name, transport.get_remote_server_key(), on_message=self.on_message
            )
            transport.auth_publickey(self.address.user, self._key)
            transport.set_keepalive(self.keepalive_s)
            return transport
        except HostKeyError:
            transport.close()
            raise
        except paramiko.AuthenticationException as error:
            transport.close()
            raise AuthenticationError(
                f"{self.address.user}@{self.address.host}:{self.address.port} did not accept the "
                f"SSH key {self.key_path}: {error}",
            ) from None
        except BaseException as error:
            transport.close()
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            raise connect_error(self.address, error) from None

    def drop(self) -> None:
        """Forget the current transport (after a loss); the next call reconnects."""
        if self._transport is not None:
            # Closing a dead transport may fail; it is gone either way.
            with contextlib.suppress(Exception):
                self._transport.close()
        self._transport = None

    close = drop


def _default_name(address: SshAddress) -> str:
    return host_key_name(address.host, address.port)


def _enable_tcp_keepalive(sock: socket.socket) -> None:
    """Let the OS notice a silently dead peer during a long, quiet command.

    Also turns Nagle's algorithm off: SSH sends small request packets and waits for the reply,
    and Nagle plus delayed ACKs would add about 40 ms to every command's round trip.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    sock.settimeout(None)


def environment_prefix(environment_file: str | None) -> str:
    """Shell text that loads the pod's environment the way its login shell would."""
    if not environment_file:
        return ""
    quoted = environment_file.replace("'", "'\\''")
    return f"{{ [ -r '{quoted}' ] && . '{quoted}'; }} >/dev/null 2>&1; "


__all__ = [
    "CONTAINER_NOT_FOUND",
    "PTY_REFUSAL",
    "SshAddress",
    "SshConnection",
    "connect_error",
    "environment_prefix",
    "load_private_key",
    "lost_error",
]
