"""`hctl ssh-config`: a Host entry in ~/.ssh/config, so plain ssh, scp and VS Code reach a machine.

The entry sits between two marker lines naming it, so writing it again replaces it in place
(idempotent) and the rest of the file is never touched. It trusts the host key hctl recorded:
`UserKnownHostsFile` points at hctl's known_hosts and, for a pod, `HostKeyAlias` names its entry.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel


class HostEntry(BaseModel):
    alias: str
    host: str
    port: int
    user: str
    key_path: Path
    known_hosts: Path
    host_key_alias: str | None = None
    strict: bool = True  # the key is already in hctl's known_hosts: accept no other
    request_tty: bool = False  # RunPod's proxy: only interactive sessions

    def render(self) -> str:
        lines = [
            f"Host {self.alias}",
            f"    HostName {self.host}",
            f"    Port {self.port}",
            f"    User {self.user}",
            f'    IdentityFile "{self.key_path}"',
            "    IdentitiesOnly yes",
            f'    UserKnownHostsFile "{self.known_hosts}"',
            "    StrictHostKeyChecking yes"
            if self.host_key_alias
            else "    StrictHostKeyChecking ask",
            "    ServerAliveInterval 15",
        ]
        if self.host_key_alias:
            lines.append(f"    HostKeyAlias {self.host_key_alias}")
        if self.request_tty:
            lines.append("    RequestTTY force")
        return "\n".join(lines) + "\n"


def _markers(alias: str) -> tuple[str, str]:
    return f"# >>> hctl {alias} >>>", f"# <<< hctl {alias} <<<"


def write_host_entry(entry: HostEntry, config_path: Path | None = None) -> bool:
    """Put `entry` into the ssh config; returns False when it was already there unchanged."""
    path = config_path if config_path is not None else Path.home() / ".ssh" / "config"
    begin, end = _markers(entry.alias)
    block = f"{begin}\n{entry.render()}{end}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if begin in text and end in text:
        start = text.index(begin)
        stop = text.index(end, start) + len(end)
        if stop < len(text) and text[stop] == "\n":
            stop += 1
        updated = text[:start] + block + text[stop:]
    else:
        separator = (
            "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        )
        updated = text + separator + block
    if updated == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(updated, encoding="utf-8")
    path.chmod(0o600)
    return True
