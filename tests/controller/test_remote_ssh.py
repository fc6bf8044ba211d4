"""Both SSH paths against a real sshd: plain (exec + SFTP) and proxy-like (PTY only, no SFTP)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hctl.errors import (
    AuthenticationError,
    CommandTimeoutError,
    ConfigError,
    ConnectError,
    ConnectionLostError,
    HostKeyError,
    TransferError,
)
from hctl.remote.base import Remote
from hctl.remote.direct import DirectRemote
from hctl.remote.hostkeys import KnownHosts, host_key_name
from hctl.remote.proxy import ProxyRemote
from hctl.remote.ssh import SshAddress, SshConnection
from hctl.settings import load_settings
from hctl.targets import resolve_target
from tests.standins.sshd import SshdServer


def connection_to(server: SshdServer, **options: object) -> SshConnection:
    address = SshAddress(user=server.user, host=server.host, port=server.port)
    return SshConnection(address, key_path=server.client_key_path, **options)  # type: ignore[arg-type]


@pytest.fixture(params=["direct", "proxy"])
def remote(
    request: pytest.FixtureRequest, sshd_pod: SshdServer, sshd_proxy: SshdServer
) -> Iterator[Remote]:
    """The same tests, through exec channels and through a PTY shell."""
    server = sshd_pod if request.param == "direct" else sshd_proxy
    kind = DirectRemote if request.param == "direct" else ProxyRemote
    made = kind(connection_to(server), environment_file=str(server.environment_file))
    made.server = server  # type: ignore[attr-defined]  # for the tests that drop connections
    yield made
    made.close()


def test_exit_codes_zero_one_and_127_come_back(remote: Remote) -> None:
    assert remote.run("true").exit_code == 0
    assert remote.run("false").exit_code == 1
    missing = remote.run("no-such-command-anywhere")
    assert missing.exit_code == 127
    assert "not found" in missing.output + missing.stderr
    assert remote.run("exit 42").exit_code == 42


def test_output_is_exact_crlf_colours_non_ascii_and_no_final_newline(remote: Remote) -> None:
    result = remote.run(r"printf 'a\r\nb\n\033[31mred\033[0m caf\303\251 \342\234\223'")
    assert result.output == "a\r\nb\n\x1b[31mred\x1b[0m café ✓"


def test_quotes_and_shell_syntax_survive(remote: Remote) -> None:
    result = remote.run(
        """echo "it's" 'a "quoted" word' $((6*7)) | tr a-z A-Z; echo $'tab\\there'"""
    )
    assert result.output == 'IT\'S A "QUOTED" WORD 42\ntab\there\n'
    # A syntax error is an exit code, not a broken session.
    assert remote.run("echo 'unterminated").exit_code != 0
    assert remote.run("echo still here").output == "still here\n"


def test_stdin_is_empty_and_the_pod_environment_is_loaded(remote: Remote) -> None:
    assert remote.run("cat; echo done").output == "done\n"
    assert remote.run("echo $RUNPOD_POD_ID").output == "sshd-pod\n"
    assert remote.run("nvidia-smi --query-gpu=name --format=csv,noheader").output == (
        "NVIDIA GeForce RTX 4090\n"
    )


def test_output_streams_as_it_arrives(remote: Remote) -> None:
    pieces: list[str] = []
    result = remote.run("for i in 1 2 3; do echo line$i; sleep 0.05; done", on_output=pieces.append)
    assert result.output == "line1\nline2\nline3\n"
    assert len(pieces) >= 2  # it did not all come at once at the end
    assert "".join(pieces) == result.output


def test_timeout_interrupts_and_the_remote_stays_usable(remote: Remote) -> None:
    with pytest.raises(CommandTimeoutError):
        remote.run("sleep 20", timeout=0.5)
    assert remote.run("echo after").output == "after\n"


def test_a_callback_that_raises_stops_the_command(remote: Remote) -> None:
    class Enough(Exception):
        pass

    seen: list[str] = []

    def take_two(text: str) -> None:
        seen.append(text)
        if "".join(seen).count("\n") >= 2:
            raise Enough

    with pytest.raises(Enough):
        remote.run("while true; do echo tick; sleep 0.02; done", on_output=take_two)
    assert remote.run("echo next").output == "next\n"


def test_direct_path_keeps_stderr_separate(sshd_pod: SshdServer) -> None:
    remote = DirectRemote(connection_to(sshd_pod))
    errors: list[str] = []
    result = remote.run("echo out; echo err >&2; exit 3", on_stderr=errors.append)
    assert (result.exit_code, result.output, result.stderr) == (3, "out\n", "err\n")
    assert "".join(errors) == "err\n"
    remote.close()


def test_the_proxy_refuses_sessions_without_a_pty(sshd_proxy: SshdServer) -> None:
    remote = DirectRemote(connection_to(sshd_proxy))
    with pytest.raises(ConnectError) as caught:
        remote.run("echo hi")
    assert "doesn't support PTY" in caught.value.message
    assert "--pty" in caught.value.hint
    remote.close()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """50 MiB of random bytes: every byte value, no structure to compress."""
    path = tmp_path_factory.mktemp("big") / "weights.bin"
    path.write_bytes(os.urandom(50 * 1024 * 1024))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fifty_megabytes_upload_exactly(remote: Remote, big_file: Path, tmp_path: Path) -> None:
    destination = tmp_path / "nested" / "folder" / "weights.bin"
    remote.put(big_file, str(destination))
    assert sha256(destination) == sha256(big_file)
    assert not list(destination.parent.glob("*.hctl-part"))


def test_download_is_binary_safe(remote: Remote, tmp_path: Path) -> None:
    source = tmp_path / "all-bytes.bin"
    source.write_bytes(bytes(range(256)) * 4096 + b"\r\n\x03\x04 end")
    copy = tmp_path / "home" / "copy.bin"
    remote.get(str(source), copy)
    assert copy.read_bytes() == source.read_bytes()
    with pytest.raises(TransferError):
        remote.get(str(tmp_path / "missing.bin"), tmp_path / "never.bin")
    assert not (tmp_path / "never.bin").exists()


def test_upload_into_an_unwritable_place_is_a_transfer_error(
    remote: Remote, tmp_path: Path
) -> None:
    source = tmp_path / "small.txt"
    source.write_text("hello")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(TransferError):
        remote.put(source, str(blocker / "inside" / "small.txt"))
    assert remote.run("echo usable").output == "usable\n"


def test_proxy_path_has_no_sftp_yet_moves_files(sshd_proxy: SshdServer, tmp_path: Path) -> None:
    direct = DirectRemote(connection_to(sshd_proxy))
    source = tmp_path / "x.txt"
    source.write_text("x")
    with pytest.raises((TransferError, ConnectError)):
        direct.put(source, str(tmp_path / "y.txt"))
    direct.close()


def test_dropped_connection_is_reported_and_the_next_call_reconnects(remote: Remote) -> None:
    server: SshdServer = remote.server  # type: ignore[attr-defined]
    connection = remote.connection  # type: ignore[attr-defined]
    assert remote.run("echo first").exit_code == 0
    dropped: list[int] = []

    def drop_on_first_output(_text: str) -> None:
        if not dropped:
            # Kill the session's sshd processes, as a network drop or a pod restart would.
            dropped.append(server.drop_connections())

    with pytest.raises(ConnectionLostError) as caught:
        remote.run("echo started; sleep 20", on_output=drop_on_first_output)
    assert dropped and dropped[0] >= 1
    assert "reconnects" in caught.value.hint
    assert remote.run("echo again").output == "again\n"
    assert connection.connects == 2


def test_host_key_is_recorded_then_a_changed_one_is_refused(
    sshd_pod: SshdServer, sshd_other_host_key: SshdServer
) -> None:
    known = KnownHosts()
    messages: list[str] = []
    first = DirectRemote(connection_to(sshd_pod, known_hosts=known, on_message=messages.append))
    assert first.run("true").exit_code == 0
    first.close()
    name = host_key_name(sshd_pod.host, sshd_pod.port)
    assert name in known.names()
    assert any("Recorded the host key" in message for message in messages)
    # The same name, another machine answering: the key differs.
    impostor = connection_to(sshd_other_host_key, known_hosts=known, host_key_name=name)
    with pytest.raises(HostKeyError) as caught:
        DirectRemote(impostor).run("true")
    assert "changed" in caught.value.message
    assert f"hctl forget-host '{name}'" in caught.value.hint
    # After forgetting it, first contact again records the new key.
    assert known.forget(name)
    replaced = DirectRemote(
        connection_to(sshd_other_host_key, known_hosts=known, host_key_name=name)
    )
    assert replaced.run("true").exit_code == 0
    replaced.close()


def test_a_key_the_server_does_not_know_is_an_authentication_error(
    sshd_pod: SshdServer, tmp_path: Path
) -> None:
    import subprocess

    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    address = SshAddress(user="root", host=sshd_pod.host, port=sshd_pod.port)
    with pytest.raises(AuthenticationError) as caught:
        DirectRemote(SshConnection(address, key_path=stranger)).run("true")
    assert "did not accept the SSH key" in caught.value.message
    assert "hctl doctor" in caught.value.hint


def test_a_missing_key_points_at_hctl_ssh_key(sshd_pod: SshdServer, tmp_path: Path) -> None:
    address = SshAddress(user="root", host=sshd_pod.host, port=sshd_pod.port)
    with pytest.raises(ConfigError) as caught:
        DirectRemote(SshConnection(address, key_path=tmp_path / "nope")).run("true")
    assert "hctl ssh-key" in caught.value.hint


def test_a_refused_port_retries_with_backoff_then_explains(
    tmp_path: Path, sshd_pod: SshdServer
) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps: list[float] = []
    address = SshAddress(user="root", host="127.0.0.1", port=port)
    connection = SshConnection(address, key_path=sshd_pod.client_key_path, sleep=sleeps.append)
    with pytest.raises(ConnectError) as caught:
        DirectRemote(connection).run("true")
    assert "Connection refused" in caught.value.message
    assert "proxy" in caught.value.hint
    assert sleeps == [1.0, 2.0]


def test_resolve_target_picks_the_path_from_the_address(
    sshd_pod: SshdServer, sshd_proxy: SshdServer
) -> None:
    settings = load_settings(ssh_key=sshd_pod.client_key_path)
    plain = resolve_target(sshd_pod.address, settings)
    assert plain.kind == "direct"
    forced = resolve_target(sshd_pod.address, settings, force_pty=True)
    assert forced.kind == "proxy"
    assert forced.run("[ -t 1 ] && echo tty").output == "tty\n"
    proxy_settings = load_settings(
        ssh_key=sshd_pod.client_key_path, ssh_proxy_host="127.0.0.1", ssh_proxy_port=sshd_proxy.port
    )
    automatic = resolve_target(sshd_proxy.address, proxy_settings)
    assert automatic.kind == "proxy"
    assert automatic.run("echo via proxy").output == "via proxy\n"
    for made in (plain, forced, automatic):
        made.close()


def test_two_threads_do_not_share_one_channel_by_accident(sshd_pod: SshdServer) -> None:
    remote = DirectRemote(connection_to(sshd_pod))
    results: list[str] = []

    def work(index: int) -> None:
        results.append(remote.run(f"echo {index}").output)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [f"{index}\n" for index in range(4)]
    remote.close()


def test_an_interrupted_direct_command_really_stops(sshd_pod: SshdServer, tmp_path: Path) -> None:
    remote = DirectRemote(connection_to(sshd_pod))
    marker = tmp_path / "survived"
    with pytest.raises(CommandTimeoutError):
        remote.run(f"sleep 1.5; touch {marker}", timeout=0.3)
    import time

    time.sleep(1.7)
    assert not marker.exists()
    remote.close()


def test_forgetting_one_host_keeps_the_others(
    sshd_pod: SshdServer, sshd_other_host_key: SshdServer, tmp_path: Path
) -> None:
    known = KnownHosts(tmp_path / "known_hosts")
    known.check("pod-a", sshd_pod.host_key, on_message=lambda _m: None)
    known.check("pod-b", sshd_other_host_key.host_key, on_message=lambda _m: None)
    assert known.forget("pod-a") and not known.forget("pod-a")
    assert known.names() == ["pod-b"]
    known.check("pod-b", sshd_other_host_key.host_key, on_message=lambda _m: None)  # still valid
