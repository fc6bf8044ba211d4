"""Host keys hctl has seen: recorded on first contact, checked on every later one.

The file is `<hctl home>/known_hosts`, in OpenSSH's format, so plain `ssh` can use it too
(`hctl ssh-config` points `UserKnownHostsFile` at it). Each entry is named after the machine it
belongs to: `[host]:port` (or just `host` on port 22) for an SSH address, and `pod-<id>` for a
pod's direct endpoint, whose public address changes whenever the pod restarts.

A key that differs from the recorded one is refused with `HostKeyError`; `hctl forget-host NAME`
removes the old entry once the user knows why it changed (a re-created pod, a rebuilt machine).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from pathlib import Path

import paramiko

from hctl.errors import HostKeyError
from hctl.settings import hctl_home


def host_key_name(host: str, port: int) -> str:
    """The name OpenSSH would file this address under."""
    return host if port == 22 else f"[{host}]:{port}"


def fingerprint(key: paramiko.PKey) -> str:
    """The SHA256 fingerprint, as `ssh-keygen -l` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class KnownHosts:
    """The known-hosts file in hctl's home (or at `path`)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else hctl_home() / "known_hosts"

    def _load(self) -> paramiko.HostKeys:
        keys = paramiko.HostKeys()
        if self.path.exists():
            keys.load(str(self.path))
        return keys

    def key_types(self, name: str) -> list[str]:
        """The key types recorded for `name`, so the handshake asks for one of those."""
        entry = self._load().lookup(name)
        return list(entry.keys()) if entry else []

    def check(self, name: str, key: paramiko.PKey, *, on_message: Callable[[str], None]) -> None:
        """Accept a recorded key, record a new one, refuse a changed one."""
        keys = self._load()
        entry = keys.lookup(name)
        if entry is None or key.get_name() not in entry:
            if entry:
                raise self._changed(name, key, next(iter(entry.values())))
            keys.add(name, key.get_name(), key)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            keys.save(str(self.path))
            on_message(f"Recorded the host key of {name} ({fingerprint(key)}) in {self.path}.")
            return
        if entry[key.get_name()] != key:
            raise self._changed(name, key, entry[key.get_name()])

    def _changed(self, name: str, offered: paramiko.PKey, recorded: paramiko.PKey) -> HostKeyError:
        return HostKeyError(
            f"The host key of {name} has changed: it offered {offered.get_name()} "
            f"{fingerprint(offered)}, but {recorded.get_name()} {fingerprint(recorded)} was "
            "recorded. Someone may be intercepting the connection, or the machine was rebuilt.",
            f"If you know why it changed, run `hctl forget-host '{name}'` (or delete its line "
            f"from {self.path}) and connect again.",
        )

    def forget(self, name: str) -> bool:
        """Remove every key recorded for `name`; False when there was none."""
        keys = self._load()
        if keys.lookup(name) is None:
            return False
        while True:  # one entry per key type
            try:
                del keys[name]
            except KeyError:
                break
        keys.save(str(self.path))
        return True

    def names(self) -> list[str]:
        return sorted(self._load().keys())
