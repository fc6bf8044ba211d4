"""The SSH key hctl reaches pods with: made once on this machine, registered with the account.

The private key is an ed25519 key in OpenSSH format, readable only by its owner (0600), with its
public half next to it (`<key>.pub`). RunPod keeps an account's keys in one newline-separated
string, which only a whole-string update can change, so registering reads it, adds the key when it
is missing, and writes it back: the user's other keys stay.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hctl.errors import ConfigError


@runtime_checkable
class KeyRegistry(Protocol):
    """Where an account keeps its SSH public keys (RunPod: `myself.pubKey`)."""

    def account_public_keys(self) -> str: ...

    def set_account_public_keys(self, keys: str) -> None: ...


def ensure_key(path: Path) -> tuple[str, bool]:
    """The public key (`type base64 comment`) for the private key at `path`, making one if none.

    Returns the public key and whether it was just created.
    """
    if path.exists():
        return public_key(path), False
    generate_key(path)
    return public_key(path), True


def generate_key(path: Path, comment: str | None = None) -> None:
    """Write a new ed25519 key pair: `path` (0600, OpenSSH format) and `path.pub`."""
    if path.exists():
        raise ConfigError(
            f"{path} exists already; hctl never overwrites a key.",
            "Use it as it is, or choose another path with `hctl config set ssh_key PATH`.",
        )
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    label = comment or f"hctl@{socket.gethostname()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(path, private)
        path.with_name(path.name + ".pub").write_text(f"{public.decode()} {label}\n")
    except OSError as error:
        raise ConfigError(
            f"Cannot write the SSH key {path}: {error.strerror or error}.",
            "Choose another place with `hctl config set ssh_key PATH`.",
        ) from None


def _write_private(path: Path, data: bytes) -> None:
    # Created with 0600 from the start: the key is never readable by others, not even briefly.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)  # Windows ignores the mode at creation; this is the closest it gets.


def public_key(path: Path) -> str:
    """The public half of the key at `path`: from `path.pub`, else derived from the key itself."""
    public_path = path.with_name(path.name + ".pub")
    if public_path.exists():
        text = public_path.read_text().strip()
        if text:
            return text
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(
            f"Cannot read the SSH key {path}: {error}.",
            "hctl needs an unencrypted OpenSSH key; `hctl config set ssh_key PATH` picks another, "
            "or move this one away and run `hctl ssh-key` to make a new one.",
        ) from None
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return public.decode()


def _key_identity(line: str) -> tuple[str, str] | None:
    """A key line's type and base64 body, which identify it whatever its comment says."""
    parts = line.split()
    return (parts[0], parts[1]) if len(parts) >= 2 else None


def register_key(registry: KeyRegistry, key: str) -> bool:
    """Add `key` to the account's keys unless it is there already; True when it was added."""
    existing = registry.account_public_keys()
    identities = {_key_identity(line) for line in existing.splitlines() if line.strip()}
    if _key_identity(key) in identities:
        return False
    # RunPod's clients separate keys with a blank line; any line break works.
    updated = f"{existing.rstrip()}\n\n{key.strip()}" if existing.strip() else key.strip()
    registry.set_account_public_keys(updated)
    return True


def pod_public_keys(registry: object, key: str) -> str:
    """What a new pod's `PUBLIC_KEY` holds: hctl's key plus the account's other keys.

    Setting `PUBLIC_KEY` replaces the keys RunPod would inject, so the account's keys are added to
    keep them working on the pod. Without an account to ask (another provider), only hctl's key.
    """
    if not isinstance(registry, KeyRegistry):
        return key
    lines = [key.strip()]
    seen = {_key_identity(key)}
    for line in registry.account_public_keys().splitlines():
        identity = _key_identity(line)
        if identity is not None and identity not in seen:
            seen.add(identity)
            lines.append(line.strip())
    return "\n".join(lines)
