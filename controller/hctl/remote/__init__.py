"""How commands reach a machine: SSH through RunPod's proxy (PTY), direct SSH, or this machine.

Modules (the `Remote` protocol is in `base`; get a Remote from `hctl.targets.resolve_target`):

- `base` — the `Remote` protocol and `CommandResult`; the contract every path keeps.
- `ssh` — `SshAddress`, `SshConnection` (key, host-key check, keepalives, reconnect with
  backoff) and the translation of paramiko/socket errors into `hctl.errors`.
- `hostkeys` — `KnownHosts`: `<hctl home>/known_hosts`, recorded on first contact, checked after.
- `framing` — how commands, exit codes and files travel through an interactive shell.
- `proxy` — `ProxyRemote`: the PTY path (RunPod's proxy, `--pty`).
- `direct` — `DirectRemote`: exec channels and SFTP.
- `local` — `LocalRemote`: a subprocess on this machine.
- `interactive` — `hctl connect`'s raw terminal session (POSIX and Windows).
- `gpu`, `monitor` — nvidia-smi and df parsing, status tables, the live monitor.
- `doctor`, `ssh_config` — `hctl doctor`'s checks, `hctl ssh-config`'s Host entries.
"""
