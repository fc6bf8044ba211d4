"""Installing the worker: the wheel, the decisions, and real installs on the sshd pod."""

from __future__ import annotations

import base64
import hashlib
import sys
import time
import zipfile
from pathlib import Path

import pytest

import hctl
from hctl import setup
from hctl import wheel as worker_wheel
from hctl.errors import JobError
from hctl.remote.direct import DirectRemote
from hctl.remote.proxy import ProxyRemote
from hctl.remote.ssh import SshAddress, SshConnection
from hctl.settings import load_settings
from tests.standins.sshd import SshdServer


def test_the_wheel_holds_both_packages_metadata_and_a_valid_record(tmp_path: Path) -> None:
    wheel = worker_wheel.build_wheel(tmp_path)
    assert wheel.name == f"hctl-{hctl.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {"hctl/__init__.py", "hctl_worker/__init__.py", "hctl_worker/cli.py"} <= names
        assert not any("__pycache__" in name for name in names)
        info = f"hctl-{hctl.__version__}.dist-info"
        metadata = archive.read(f"{info}/METADATA").decode()
        assert f"Version: {hctl.__version__}" in metadata
        assert 'Requires-Dist: transformers>=4.55.2; extra == "worker"' in metadata
        assert (
            "hctl-worker = hctl_worker.cli:main"
            in archive.read(f"{info}/entry_points.txt").decode()
        )
        assert (
            archive.read(f"{info}/{worker_wheel.BUILD_ID_FILE}").decode().strip()
            == worker_wheel.build_id()
        )
        for line in archive.read(f"{info}/RECORD").decode().splitlines():
            name, digest, size = line.split(",")
            if not digest:
                continue
            data = archive.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert digest == f"sha256={expected.decode()}" and int(size) == len(data)


def probe(**fields: object) -> setup.PythonProbe:
    defaults: dict[str, object] = {
        "executable": "/usr/bin/python3",
        "version": "3.11.9",
        "hctl": hctl.__version__,
        "torch": "2.8.0+cu128",
        "transformers": "4.57.1",
        "accelerate": "1.10.0",
    }
    return setup.PythonProbe(**{**defaults, **fields})


def test_what_makes_a_worker_unusable() -> None:
    build = worker_wheel.build_id()
    assert setup.worker_problems(probe(), build) == []
    assert setup.worker_problems(probe(build_id=build), build) == []
    assert "different build" in setup.worker_problems(probe(build_id="other"), build)[0]
    assert "hctl" in setup.worker_problems(probe(hctl="0.0.1"), build)[0]
    # The owner's compatibility table: old torch images and an old transformers need upgrades.
    assert "torch 2.1.0" in setup.worker_problems(probe(torch="2.1.0"), build)[0]
    assert "Qwen3" in setup.worker_problems(probe(transformers="4.44.0"), build)[0]


def test_torch_is_pinned_unless_it_is_too_old() -> None:
    assert setup.torch_constraints(probe(torch="2.8.0+cu128")) == (["torch==2.8.0+cu128"], None)
    constraints, note = setup.torch_constraints(probe(torch="2.1.0"))
    assert constraints == [] and note and "older than 2.2" in note


def test_the_probe_ignores_banners_and_noise() -> None:
    text = (
        "Welcome to the pod!\n"
        'HCTL_VENV {"executable": "/v/bin/python", "version": "3.12.1", "hctl": "0.0.9"}\n'
        'HCTL_PROBE {"executable": "/usr/bin/python3", "version": "3.12.1", "torch": "2.8.0"}\n'
        'HCTL_DISK {"volume": "/workspace", "volume_exists": true, "volume_free_gb": 40.5,'
        ' "container_free_gb": 12.0, "home": "/root"}\n'
    )
    parsed = setup.parse_probe(text, "/workspace")
    assert parsed.venv and parsed.venv.hctl == "0.0.9"
    assert parsed.base and parsed.base.torch == "2.8.0"
    assert parsed.volume_exists and parsed.volume_free_gb == 40.5


def connection_to(server: SshdServer) -> SshConnection:
    address = SshAddress(user=server.user, host=server.host, port=server.port)
    return SshConnection(address, key_path=server.client_key_path)


@pytest.mark.worker  # the stand-in pod's worker is this environment's
def test_present_worker_is_found_in_one_round_trip(sshd_pod: SshdServer, tmp_path: Path) -> None:
    remote = DirectRemote(connection_to(sshd_pod))
    started = time.monotonic()
    info = setup.ensure_worker(
        remote, load_settings(), volume_path=str(tmp_path), python=sys.executable
    )
    assert time.monotonic() - started < 5
    assert not info.installed and info.version == hctl.__version__
    assert info.environment["HF_HOME"] == f"{tmp_path}/.cache/huggingface"
    assert remote.run(f"{info} version").output.strip() == hctl.__version__
    remote.close()


@pytest.mark.worker  # the stand-in pod's worker is this environment's
def test_install_through_the_pty_path_reuses_torch_and_leaves_the_dev_venv_alone(
    sshd_proxy: SshdServer, tmp_path: Path
) -> None:
    remote = ProxyRemote(connection_to(sshd_proxy))
    messages: list[str] = []
    volume = tmp_path / "workspace"
    volume.mkdir()
    info = setup.ensure_worker(
        remote,
        load_settings(),
        volume_path=str(volume),
        python=sys.executable,
        reinstall=True,
        min_free_gb=0.01,
        on_message=messages.append,
    )
    assert info.installed
    assert info.command == f"{volume}/hctl/venv/bin/hctl-worker"
    assert any("uploading" in message for message in messages)
    where = remote.run(
        f"{volume}/hctl/venv/bin/python -c 'import hctl, torch; print(hctl.__file__); "
        "print(torch.__file__)'"
    ).output.split()
    assert where[0].startswith(f"{volume}/hctl/venv/")  # the worker lives in its venv
    assert not where[1].startswith(str(volume))  # torch was reused, not installed again
    assert Path(hctl.__file__).is_relative_to(Path(__file__).resolve().parents[2])
    # Idempotent: the next call finds it at once, in the venv.
    again = setup.ensure_worker(
        remote, load_settings(), volume_path=str(volume), python=sys.executable
    )
    assert not again.installed and again.command == info.command
    remote.close()


def test_too_little_disk_and_no_python_are_clear_errors(
    sshd_pod: SshdServer, tmp_path: Path
) -> None:
    remote = DirectRemote(connection_to(sshd_pod))
    with pytest.raises(JobError) as caught:
        setup.ensure_worker(
            remote,
            load_settings(),
            volume_path=str(tmp_path),
            python=sys.executable,
            reinstall=True,
            min_free_gb=1e9,
        )
    assert "free on" in caught.value.message and "--volume" in caught.value.hint
    with pytest.raises(JobError) as missing:
        setup.ensure_worker(remote, load_settings(), volume_path=str(tmp_path), python="/no/python")
    assert "No Python" in missing.value.message
    remote.close()
