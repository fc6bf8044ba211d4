"""A real OpenSSH server on 127.0.0.1 standing in for a GPU pod.

Fixtures (session-scoped: each server starts once per test session, in about 0.1 s):

- `sshd_pod` — a plain sshd, like a pod's *direct* endpoint: exec channels, separate stdout and
  stderr, real exit codes, SFTP.
- `sshd_proxy` — a PTY-only sshd, like RunPod's proxy (`ssh.runpod.io`): a `ForceCommand` refuses
  any session without a terminal with RunPod's own message ("Your SSH client doesn't support
  PTY") and otherwise runs an interactive bash; there is no SFTP subsystem. Only hctl's PTY path
  can pass.

Both are `SshdServer` objects with:

- `.host` ("127.0.0.1"), `.port`, `.user` ("root"), `.address` (`ssh://root@127.0.0.1:PORT`),
- `.client_key_path` — the authorised private key (ed25519, OpenSSH format, no passphrase),
- `.host_key` — the server's public host key as a `paramiko.PKey`; `.host_key_line` as text,
- `.state_dir` — the fake `nvidia-smi`'s folder: write "pid,name,MiB" lines to
  `state_dir / "gpu_processes"` to make processes "hold GPU memory" (see `set_gpu_processes`),
- `.environment_file` — a file in the style of RunPod's `/etc/rp_environment` (it exports
  `RUNPOD_POD_ID=sshd-pod`); pass it to the remotes' `environment_file=` to test its loading,
- `.drop_connections()` — kills every connection's sshd process (and what runs under it), the
  way a network drop or a pod restart would; the server keeps listening,
- `.home` — the sessions' HOME (an empty folder in the fixture's temp dir),
- `.settings_overrides()` — keyword arguments for `hctl.settings.load_settings` (the key file).

The sessions' PATH starts with `tests/standins/bin`, where the fake `nvidia-smi` lives (it loops
fast: `-l 1` sleeps 0.05 s, so monitor tests stay quick), then the bin folder of the Python running
the tests: `python3` on the "pod" is the development venv, with torch and the editable hctl, so
`hctl.setup.ensure_worker` finds the worker at once and installs nothing. HOME is an empty folder
of the fixture's own (so this machine's ~/.bashrc is not run).

Also here: `sshd_other_host_key`, a third server with a *different* host key listening on its
own port, for changed-key tests (point a known-hosts entry recorded from one server at it), and
`make_sshd(tmp_path, mode=...)` for tests that need their own short-lived server (modes "plain",
"proxy", and "container-gone": RunPod's proxy answering "container not found").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import pytest

SSHD = "/usr/sbin/sshd"
FAKE_BIN = Path(__file__).resolve().parent / "bin"
PTY_REFUSAL = "Your SSH client doesn't support PTY"
# The sessions find the fake nvidia-smi first, then this test run's Python environment (so
# `python3` on the "pod" has torch and the editable hctl, as a pod's python has its CUDA torch).
DEV_BIN = Path(sys.executable).parent
SESSION_PATH = f"{FAKE_BIN}:{DEV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The forced command of the proxy-like mode: RunPod's proxy refuses sessions without a terminal.
PROXY_FORCED_COMMAND = """#!/bin/sh
if [ -z "$SSH_TTY" ]; then
    echo "{refusal}. Please use 'ssh -tt' or an interactive terminal."
    exit 1
fi
exec /bin/bash --rcfile {rcfile} -i
"""

# The proxy-like mode's interactive shell: a RunPod image's root shell, prompt, colours and all.
PROXY_RCFILE = """[ -r /etc/bash.bashrc ] && . /etc/bash.bashrc
export PATH="{path}"
export FAKE_NVIDIA_SMI_STATE="{state}" FAKE_NVIDIA_SMI_INTERVAL_SCALE=0.05
PS1='\\[\\e[01;32m\\]root@pod\\[\\e[00m\\]:\\[\\e[01;34m\\]\\w\\[\\e[00m\\]# '
bind 'set enable-bracketed-paste on' 2>/dev/null
cd ~
"""


@dataclass
class SshdServer:
    """One running sshd (see the module docstring)."""

    mode: str
    root: Path
    host: str
    port: int
    user: str
    client_key_path: Path
    host_key: paramiko.PKey
    host_key_line: str
    state_dir: Path
    environment_file: Path
    pid_file: Path
    log_file: Path
    home: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return int(self.pid_file.read_text().strip())

    def settings_overrides(self) -> dict[str, object]:
        return {"ssh_key": self.client_key_path}

    def connection_pids(self) -> list[int]:
        """The per-connection sshd processes (children of the listening one)."""
        return _children(self.pid)

    def drop_connections(self) -> int:
        """Kill every open connection (and its commands); returns how many were dropped."""
        connections = self.connection_pids()
        victims: list[int] = []
        for pid in connections:
            victims.append(pid)
            victims.extend(_descendants(pid))
        # Freeze them all first (connection processes first), then kill: nothing they run gets
        # to print a last word (such as a command's end marker) between the kills.
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        return len(connections)

    def set_gpu_processes(self, processes: list[tuple[int, str, int]]) -> None:
        """Make the fake nvidia-smi report these (pid, name, MiB) as holding GPU memory."""
        lines = "".join(f"{pid},{name},{memory}\n" for pid, name, memory in processes)
        (self.state_dir / "gpu_processes").write_text(lines)

    def stop(self) -> None:
        try:
            pid = self.pid
        except (FileNotFoundError, ValueError):
            return
        self.drop_connections()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def _children(parent: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces; the ppid follows it.
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == parent:
            children.append(int(entry.name))
    return children


def _descendants(parent: int) -> list[int]:
    found = []
    for child in _children(parent):
        found.extend(_descendants(child))
        found.append(child)
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def make_sshd(
    root: Path, *, mode: str = "plain", client_key_path: Path | None = None
) -> SshdServer:
    """Start an sshd in `root` ("plain" or "proxy"); the caller stops it with `.stop()`."""
    if not Path(SSHD).exists():
        pytest.skip("OpenSSH server missing: apt-get install -y openssh-server")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    host_key_path = root / "host_ed25519"
    _keygen(host_key_path)
    if client_key_path is None:
        client_key_path = root / "client_ed25519"
        _keygen(client_key_path)
    authorized = root / "authorized_keys"
    authorized.write_text(Path(f"{client_key_path}.pub").read_text())
    state_dir = root / "gpu-state"
    state_dir.mkdir(exist_ok=True)
    environment_file = root / "rp_environment"
    environment_file.write_text(
        "export RUNPOD_POD_ID=sshd-pod\nexport HCTL_TEST_MARKER='pod env'\n"
    )
    home = root / "home"
    home.mkdir(exist_ok=True)
    port = _free_port()
    lines = [
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {host_key_path}",
        f"PidFile {root / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin yes",
        "UsePAM no",
        "StrictModes no",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "MaxStartups 50:30:100",
        "MaxSessions 50",
        "LogLevel ERROR",
        # HOME points at an empty folder so the sessions do not run this machine's own ~/.bashrc.
        f"SetEnv HOME={home} PATH={SESSION_PATH} FAKE_NVIDIA_SMI_STATE={state_dir} "
        "FAKE_NVIDIA_SMI_INTERVAL_SCALE=0.05",
    ]
    if mode == "plain":
        lines.append("Subsystem sftp internal-sftp")
    elif mode == "proxy":
        rcfile = root / "proxy_bashrc"
        rcfile.write_text(PROXY_RCFILE.format(path=SESSION_PATH, state=state_dir))
        forced = root / "proxy_forced_command"
        forced.write_text(PROXY_FORCED_COMMAND.format(refusal=PTY_REFUSAL, rcfile=rcfile))
        forced.chmod(0o755)
        lines.append(f"ForceCommand {forced}")
    elif mode == "container-gone":
        # RunPod's proxy when the pod's container is not there (stopped, crashed, starting).
        forced = root / "gone_forced_command"
        forced.write_text('#!/bin/sh\necho "Error: container not found"\nexit 1\n')
        forced.chmod(0o755)
        lines.append(f"ForceCommand {forced}")
    else:
        raise ValueError(f"unknown sshd mode {mode!r}")
    config = root / "sshd_config"
    config.write_text("\n".join(lines) + "\n")
    log_file = root / "sshd.log"
    subprocess.run([SSHD, "-f", str(config), "-E", str(log_file)], check=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {log_file.read_text()}") from None
            time.sleep(0.02)
    public_line = Path(f"{host_key_path}.pub").read_text().strip()
    key_type, key_data = public_line.split()[:2]
    host_key = paramiko.PKey.from_type_string(key_type, __import__("base64").b64decode(key_data))
    return SshdServer(
        mode=mode,
        root=root,
        host="127.0.0.1",
        port=port,
        user="root",
        client_key_path=client_key_path,
        host_key=host_key,
        host_key_line=f"{key_type} {key_data}",
        state_dir=state_dir,
        environment_file=environment_file,
        pid_file=root / "sshd.pid",
        log_file=log_file,
        home=home,
    )


@pytest.fixture(scope="session")
def _sshd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sshd")


@pytest.fixture(scope="session")
def sshd_pod(_sshd_root: Path) -> Iterator[SshdServer]:
    """A plain sshd: exec, SFTP, separate stderr (a pod's direct TCP endpoint)."""
    server = make_sshd(_sshd_root / "plain", mode="plain")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sshd_proxy(_sshd_root: Path, sshd_pod: SshdServer) -> Iterator[SshdServer]:
    """A PTY-only sshd without SFTP (RunPod's proxy); it accepts the same client key."""
    server = make_sshd(_sshd_root / "proxy", mode="proxy", client_key_path=sshd_pod.client_key_path)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sshd_other_host_key(_sshd_root: Path, sshd_pod: SshdServer) -> Iterator[SshdServer]:
    """A plain sshd with a different host key, accepting the same client key."""
    server = make_sshd(_sshd_root / "other", mode="plain", client_key_path=sshd_pod.client_key_path)
    yield server
    server.stop()


def stop_watchdog(folder: Path) -> None:
    """End the lease watchdog (`hctl.watchdog`) a test left on the stand-in pod, which is this
    machine: by the pid in its pid file, and only if that process is a watchdog."""
    try:
        pid = int((folder / "watchdog.pid").read_text().strip())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"watchdog" in command:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def copy_key(server: SshdServer, destination: Path) -> Path:
    """A copy of the server's client key (mode 0600) at `destination`, e.g. `~/.ssh/id_ed25519`."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(server.client_key_path, destination)
    destination.chmod(0o600)
    return destination
