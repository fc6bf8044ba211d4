"""The remote commands as a user types them, against the sshd pod (and the RunPod emulator)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hctl.cli import app
from tests.standins.runpod_rest_emulator import RunPodRestEmulator
from tests.standins.sshd import SshdServer


@pytest.fixture
def ssh_env(monkeypatch: pytest.MonkeyPatch, sshd_pod: SshdServer, sshd_proxy: SshdServer) -> None:
    """hctl uses the fixture's key; RunPod's proxy is the PTY-only sshd."""
    monkeypatch.setenv("HCTL_SSH_KEY", str(sshd_pod.client_key_path))
    monkeypatch.setenv("HCTL_SSH_PROXY_HOST", "127.0.0.1")
    monkeypatch.setenv("HCTL_SSH_PROXY_PORT", str(sshd_proxy.port))
    monkeypatch.setenv("HCTL_WORKER_PYTHON", sys.executable)
    monkeypatch.setenv("COLUMNS", "200")  # wide tables: no wrapped GPU names


def hctl(*args: str) -> object:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_exec_streams_and_exits_with_the_remote_code(ssh_env: None, sshd_pod: SshdServer) -> None:
    result = hctl("exec", sshd_pod.address, "--", "ls", "-d", "/", ";", "exit", "3")
    assert result.exit_code == 3
    assert result.stdout == "/\n"
    missing = hctl("exec", sshd_pod.address, "--", "no-such-command")
    assert missing.exit_code == 127


def test_exec_through_the_pty_path_and_the_proxy(
    ssh_env: None, sshd_pod: SshdServer, sshd_proxy: SshdServer
) -> None:
    forced = hctl("exec", sshd_pod.address, "--pty", "--", "[ -t 1 ] && echo terminal")
    assert (forced.exit_code, forced.stdout) == (0, "terminal\n")
    # The proxy's address needs no --pty: hctl knows it only takes PTY sessions.
    proxied = hctl("exec", sshd_proxy.address, "--", "echo", "via", "proxy;", "exit", "1")
    assert (proxied.exit_code, proxied.stdout) == (1, "via proxy\n")


def test_exec_without_a_command_explains(ssh_env: None, sshd_pod: SshdServer) -> None:
    result = hctl("exec", sshd_pod.address)
    assert result.exit_code == 2
    assert "No command given" in result.stderr


def test_a_wrong_key_is_one_line_with_a_hint(
    ssh_env: None, sshd_pod: SshdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    monkeypatch.setenv("HCTL_SSH_KEY", str(stranger))
    result = hctl("exec", sshd_pod.address, "--", "true")
    assert result.exit_code == 3
    assert "did not accept the SSH key" in result.stderr and "hint:" in result.stderr
    assert "Traceback" not in result.output


def test_status_shows_gpu_processes_disks_and_cache(ssh_env: None, sshd_pod: SshdServer) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        sshd_pod.set_gpu_processes([(sleeper.pid, "python3", 14000)])
        result = hctl("status", sshd_pod.address)
    finally:
        sshd_pod.set_gpu_processes([])
        sleeper.kill()
        sleeper.wait()
    assert result.exit_code == 0, result.output
    # Piped: each table's tab-separated lines on stdout, no box drawing; titles on stderr.
    lines = result.stdout.splitlines()
    assert lines[0].split("\t") == ["GPU", "name", "util", "memory", "temp", "power"]
    gpu = lines[1].split("\t")
    assert gpu[1] == "NVIDIA GeForce RTX 4090" and gpu[2] == "97 %"
    assert gpu[3] == "14870 / 24564 MiB"
    assert f"{sleeper.pid}\tpython3\t14000 MiB" in lines
    assert ["mount", "free", "size"] in [line.split("\t") for line in lines]
    assert not any(character in result.stdout for character in "┃━─│")
    assert "Disks" in result.stderr and "Processes using the GPU" in result.stderr


def test_monitor_shows_n_samples_then_stops(ssh_env: None, sshd_proxy: SshdServer) -> None:
    result = hctl("monitor", sshd_proxy.address, "--count", "2")
    assert result.exit_code == 0, result.output
    assert "RTX 4090" in result.stdout and "312 / 450 W" in result.stdout
    # The long-lived nvidia-smi was interrupted: the session is clean for the next command.
    again = hctl("exec", sshd_proxy.address, "--", "echo ok")
    assert again.stdout == "ok\n"


def test_monitor_piped_writes_one_tab_separated_line_per_gpu_and_sample(
    ssh_env: None, sshd_pod: SshdServer
) -> None:
    result = hctl("monitor", sshd_pod.address, "--count", "2")
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split("\t") == ["GPU", "name", "util", "memory", "temp", "power"]
    assert rows == ["0\tNVIDIA GeForce RTX 4090\t97 %\t14870 / 24564 MiB\t63 °C\t312 / 450 W"] * 2


def _detached_sleeper() -> int:
    """A process that is not this test's child (like a GPU job): its pid."""
    output = subprocess.run(
        ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True
    ).stdout
    return int(output.strip())


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def test_gpu_free_stops_only_the_listed_processes_after_confirmation(
    ssh_env: None, sshd_pod: SshdServer
) -> None:
    holder, bystander = _detached_sleeper(), _detached_sleeper()
    try:
        sshd_pod.set_gpu_processes([(holder, "python3", 20000), (1, "init", 1)])
        refused = hctl("gpu-free", sshd_pod.address)  # no terminal to ask on, no --yes
        assert refused.exit_code == 130
        assert _running(holder)
        result = hctl("gpu-free", sshd_pod.address, "--yes")
        assert result.exit_code == 0, result.output
        assert f"Stopped 1 of 1: {holder}" in result.stdout
        assert not _running(holder)
        assert _running(bystander)
    finally:
        sshd_pod.set_gpu_processes([])
        for pid in (holder, bystander):
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.worker  # the stand-in pod's worker is this environment's
def test_setup_is_fast_and_idempotent_when_the_worker_is_there(
    ssh_env: None, sshd_pod: SshdServer
) -> None:
    result = hctl("setup", sshd_pod.address)
    assert result.exit_code == 0, result.output
    assert "already installed" in result.stdout


def test_ssh_config_writes_one_entry_idempotently(ssh_env: None, sshd_pod: SshdServer) -> None:
    printed = hctl("ssh-config", sshd_pod.address, "--print", "--name", "gpu")
    assert "Host gpu" in printed.stdout and f"Port {sshd_pod.port}" in printed.stdout
    config = Path.home() / ".ssh" / "config"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("Host other\n    HostName example.org\n")
    assert "written" in hctl("ssh-config", sshd_pod.address, "--name", "gpu").stdout
    assert "up to date" in hctl("ssh-config", sshd_pod.address, "--name", "gpu").stdout
    text = config.read_text()
    assert text.count("Host gpu") == 1 and "Host other" in text
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    # Plain OpenSSH uses the entry, trusting exactly the host key hctl recorded.
    plain = subprocess.run(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", "gpu", "echo plain-ssh"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (plain.returncode, plain.stdout) == (0, "plain-ssh\n"), plain.stderr


def test_forget_host_of_an_unknown_name_lists_what_is_known(ssh_env: None) -> None:
    result = hctl("forget-host", "[nowhere]:22")
    assert result.exit_code == 2
    assert "No host key recorded" in result.stderr


# --- Pods from the RunPod emulator, pointed at the sshd -------------------------------------


@pytest.fixture
def pod_env(
    ssh_env: None, hctl_rest_env: RunPodRestEmulator, sshd_pod: SshdServer
) -> RunPodRestEmulator:
    hctl_rest_env.route_ssh(direct=("127.0.0.1", sshd_pod.port), pod_host_id="root")
    return hctl_rest_env


def test_exec_by_pod_id_resolves_through_the_provider(pod_env: RunPodRestEmulator) -> None:
    pod = pod_env.add_pod(name="hctl-box")
    direct = hctl("exec", pod["id"], "--", "echo hi; [ -t 1 ] || echo no-tty")
    assert (direct.exit_code, direct.stdout) == (0, "hi\nno-tty\n")
    # By name, and through the proxy with --pty.
    proxied = hctl("exec", "hctl-box", "--pty", "--", "[ -t 1 ] && echo tty")
    assert (proxied.exit_code, proxied.stdout) == (0, "tty\n")
    # No target at all: the only running hctl pod.
    assert hctl("exec", "--", "echo only").stdout == "only\n"


def test_a_refusing_direct_port_falls_back_to_the_proxy_with_a_note(
    pod_env: RunPodRestEmulator,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    pod_env.route_ssh(direct=("127.0.0.1", closed_port), pod_host_id="root")
    pod = pod_env.add_pod(name="hctl-flaky")
    result = hctl("exec", pod["id"], "--", "[ -t 1 ] && echo via-proxy")
    assert (result.exit_code, result.stdout) == (0, "via-proxy\n")
    assert "using RunPod's SSH proxy instead" in result.stderr


def test_monitor_of_a_pod_shows_its_cost(pod_env: RunPodRestEmulator) -> None:
    pod_env.add_pod(name="hctl-money")
    result = hctl("monitor", "hctl-money", "--count", "1")
    assert result.exit_code == 0, result.output
    # Piped, the rows are all stdout holds; the cost goes to stderr.
    assert "/h," in result.stderr and "since it started" in result.stderr


def test_monitor_of_a_pod_ssh_cannot_reach_yet_shows_the_apis_gpu_use(
    pod_env: RunPodRestEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    pod_env.route_ssh(direct=("127.0.0.1", closed_port), pod_host_id="root")
    monkeypatch.setenv("HCTL_SSH_PROXY_PORT", str(closed_port))  # the proxy refuses too
    monkeypatch.setenv("HCTL_CONNECT_TIMEOUT_S", "2")
    monkeypatch.setenv("COLUMNS", "200")
    pod_env.add_pod(name="hctl-booting")
    result = hctl("monitor", "hctl-booting", "--count", "2", "--interval", "1")
    assert result.exit_code == 0, result.output
    assert "Showing the GPU use RunPod reports instead" in result.stderr
    assert "as the provider reports them" in result.stderr
    # Piped: one header, then a tab-separated line per GPU and reading (the pod id whole).
    header, *rows = result.stdout.splitlines()
    assert header.split("\t") == ["pod", "status", "GPU", "util", "memory"]
    assert len(rows) == 2 and all(row.split("\t")[3] == "37 %" for row in rows)
    assert rows[0].split("\t")[0] == pod_env.pods[0]["id"]
    assert "since it started" in result.stderr
    assert len(pod_env.requests_for("get")) == 2  # read again for the second reading


def test_doctor_passes_then_names_each_failure_with_its_fix(
    pod_env: RunPodRestEmulator, sshd_pod: SshdServer
) -> None:
    pod_env.add_pod(name="hctl-doc")
    healthy = hctl("doctor")
    assert healthy.exit_code == 0, healthy.output
    assert "via proxy" in healthy.stdout and "via direct" in healthy.stdout
    sshd_pod.client_key_path.chmod(0o644)
    try:
        os.environ["RUNPOD_API_KEY"] = "wrong"
        broken = hctl("doctor")
    finally:
        sshd_pod.client_key_path.chmod(0o600)
        os.environ["RUNPOD_API_KEY"] = pod_env.api_key
    assert broken.exit_code == 1
    assert "chmod 600" in broken.stdout
    assert "FAIL" in broken.stdout and "RunPod API key" in broken.stdout


def test_ssh_config_for_a_pod_pins_its_recorded_key(pod_env: RunPodRestEmulator) -> None:
    pod = pod_env.add_pod(name="hctl-vscode")
    written = hctl("ssh-config", "hctl-vscode")
    assert written.exit_code == 0, written.output
    config = Path.home() / ".ssh" / "config"
    assert f"HostKeyAlias pod-{pod['id']}-127.0.0.1-" in config.read_text()
    plain = subprocess.run(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", "hctl-vscode", "echo vscode-ok"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (plain.returncode, plain.stdout) == (0, "vscode-ok\n"), plain.stderr


def test_exec_piped_into_head_ends_quietly_and_stops_the_remote_command(
    ssh_env: None, sshd_pod: SshdServer, tmp_path: Path
) -> None:
    """`hctl exec ... | head -2`: the reader leaves early; no error about a lost connection."""
    pid_file = tmp_path / "remote.pid"
    command = f"echo $$ > {pid_file}; seq 1 200000; sleep 60"
    process = subprocess.Popen(
        [sys.executable, "-c", "from hctl.cli import main; main()", "exec", sshd_pod.address,
         "--", command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline() == b"1\n"
    process.stdout.close()  # what `head -1` does once it has its line
    assert process.wait(timeout=60) == 141
    assert b"error:" not in process.stderr.read()
    remote_pid = int(pid_file.read_text())
    deadline = time.monotonic() + 15
    while _running(remote_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(remote_pid)
