"""The local path and the proxy's "container not found" answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from hctl.errors import CommandTimeoutError, ConnectError, TransferError
from hctl.remote.local import LocalRemote
from hctl.remote.proxy import ProxyRemote
from hctl.remote.ssh import SshAddress, SshConnection
from hctl.settings import load_settings
from hctl.targets import parse_target, resolve_target
from tests.standins.sshd import SshdServer, make_sshd


def test_local_runs_streams_and_reports_exit_codes() -> None:
    remote = resolve_target("local", load_settings())
    assert isinstance(remote, LocalRemote)
    pieces: list[str] = []
    result = remote.run("echo out; echo err >&2; exit 4", on_output=pieces.append)
    assert (result.exit_code, result.output, result.stderr) == (4, "out\n", "err\n")
    assert "".join(pieces) == "out\n"
    assert remote.run("no-such-command-here").exit_code == 127
    with pytest.raises(CommandTimeoutError):
        remote.run("sleep 20", timeout=0.3)


def test_local_put_and_get_are_verified_copies(tmp_path: Path) -> None:
    source = tmp_path / "a.bin"
    source.write_bytes(bytes(range(256)) * 100)
    remote = LocalRemote()
    remote.put(source, str(tmp_path / "deep" / "b.bin"))
    remote.get(str(tmp_path / "deep" / "b.bin"), tmp_path / "c.bin")
    assert (tmp_path / "c.bin").read_bytes() == source.read_bytes()
    with pytest.raises(TransferError):
        remote.get(str(tmp_path / "missing"), tmp_path / "d.bin")


def test_targets_parse_without_contacting_anything() -> None:
    assert parse_target("local").kind == "local"
    assert parse_target(None).kind == "pod" and parse_target(None).pod_ref is None
    assert parse_target("abc123").pod_ref == "abc123"
    address = parse_target("ssh://root@203.0.113.7:17445").address
    assert address is not None and (address.user, address.host, address.port) == (
        "root",
        "203.0.113.7",
        17445,
    )
    assert parse_target("ubuntu@gpu-box").address.port == 22  # type: ignore[union-attr]


def test_container_not_found_gets_the_owners_hint(tmp_path: Path, sshd_pod: SshdServer) -> None:
    server = make_sshd(
        tmp_path / "gone", mode="container-gone", client_key_path=sshd_pod.client_key_path
    )
    try:
        address = SshAddress(user="root", host=server.host, port=server.port)
        remote = ProxyRemote(SshConnection(address, key_path=server.client_key_path))
        with pytest.raises(ConnectError) as caught:
            remote.run("true")
        assert "container not found" in caught.value.message
        assert "still be starting" in caught.value.hint
    finally:
        server.stop()
