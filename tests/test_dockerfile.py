"""The pod image (images/Dockerfile) has the properties pods rely on.

No Docker engine runs here, so the Dockerfile is parsed and checked, and its start script is run
for real with stand-ins for `ssh-keygen`, `service` and `sshd` that record their calls.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import hctl

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "images" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / "images" / "Dockerfile.dockerignore"
START_SCRIPT = REPO_ROOT / "images" / "start.sh"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        pending += stripped
        keyword, _, arguments = pending.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = ""
    return instructions


def _key_values(arguments: str) -> dict[str, str]:
    """`KEY=value KEY2="value 2"` (ENV, LABEL, ARG) as a dictionary."""
    pairs = {}
    for token in shlex.split(arguments):
        key, separator, value = token.partition("=")
        pairs[key] = value if separator else ""
    return pairs


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def _all(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [instruction for instruction in instructions if instruction.keyword == keyword]


def _environment(instructions: list[Instruction]) -> dict[str, str]:
    environment: dict[str, str] = {}
    for instruction in _all(instructions, "ENV"):
        environment.update(_key_values(instruction.arguments))
    return environment


def _substitute(value: str, instructions: list[Instruction]) -> str:
    """Replace `${ARG}` with the ARG's default, as `docker build` does without --build-arg."""
    defaults: dict[str, str] = {}
    for instruction in _all(instructions, "ARG"):
        defaults.update(_key_values(instruction.arguments))
    return re.sub(r"\$\{(\w+)\}", lambda match: defaults.get(match[1], match[0]), value)


def test_parser_joins_continuations_and_skips_comments() -> None:
    parsed = parse_dockerfile("# c\nFROM a:1\nRUN one \\\n    # inner comment\n    two\n")
    assert [(item.keyword, item.arguments) for item in parsed] == [
        ("FROM", "a:1"),
        ("RUN", "one two"),
    ]


def test_base_is_a_pinned_runpod_pytorch_tag(instructions: list[Instruction]) -> None:
    froms = _all(instructions, "FROM")
    assert len(froms) == 1, "one stage: the worker image"
    image = froms[0].arguments.split()[0]
    assert "$" not in image, "the base must be written out, not left to a build argument"
    name, _, tag = image.split("@")[0].partition(":")
    assert name == "runpod/pytorch"
    assert tag and tag != "latest", f"pin a tag, not {tag or 'no tag'}"
    assert re.fullmatch(r"\d+\.\d+\.\d+-cu\d+-torch\d+-ubuntu\d{4}", tag), tag


def test_worker_is_installed_without_replacing_torch(instructions: list[Instruction]) -> None:
    runs = " ; ".join(instruction.arguments for instruction in _all(instructions, "RUN"))
    installs = [part for part in re.split(r"[;&|]+", runs) if "pip install" in part]
    assert installs, "the worker must be installed with pip"
    worker_installs = [part for part in installs if "[worker]" in part]
    assert worker_installs, "the project must be installed with its `worker` extra"
    for install in installs:
        words = shlex.split(install)
        assert "-U" not in words and "--upgrade" not in words, install
        assert not any(re.fullmatch(r"torch([=<>!~].*)?", word) for word in words), (
            f"pip must not be asked for torch itself: {install}"
        )
        assert "--constraint" in words or "-c" in words, f"torch is not constrained: {install}"
    # The constraint is the version already installed in the image, read at build time.
    assert "torch.__version__" in runs and "torch==${torch_version}" in runs


def test_postgresql_is_installed_for_jobs_on_several_pods(instructions: list[Instruction]) -> None:
    """The first pod of `hctl run --pods N` runs the study's PostgreSQL from the image's binaries,
    where `hctl.services.database` looks for them (Debian's versioned folder)."""
    runs = " ; ".join(instruction.arguments for instruction in _all(instructions, "RUN"))
    installs = [part for part in re.split(r"[;&|]+", runs) if "apt-get install" in part]
    assert any("postgresql" in shlex.split(install) for install in installs), installs
    assert "/usr/lib/postgresql/*/bin/pg_ctl" in runs  # the build fails without the binaries


def test_caches_are_on_the_volume_and_downloads_are_fast(instructions: list[Instruction]) -> None:
    environment = _environment(instructions)
    assert environment["HF_HOME"].startswith("/workspace/")
    assert environment["PIP_CACHE_DIR"].startswith("/workspace/")
    assert environment["HF_XET_HIGH_PERFORMANCE"] == "1"
    assert environment["HF_HUB_ENABLE_HF_TRANSFER"] == "1"
    runs = " ".join(instruction.arguments for instruction in _all(instructions, "RUN"))
    # hf_transfer enabled but missing makes older huggingface_hub releases fail every download.
    assert "hf_xet" in runs and "hf_transfer" in runs


def test_version_label_is_the_project_version(instructions: list[Instruction]) -> None:
    labels: dict[str, str] = {}
    for instruction in _all(instructions, "LABEL"):
        labels.update(_key_values(instruction.arguments))
    version = _substitute(labels["org.opencontainers.image.version"], instructions)
    assert version == hctl.__version__, (
        f"images/Dockerfile says {version}, the project is {hctl.__version__}: "
        "update ARG HCTL_VERSION"
    )


def test_start_script_is_the_command(instructions: list[Instruction]) -> None:
    copies = [item.arguments.split() for item in _all(instructions, "COPY")]
    assert ["images/start.sh", "/hctl-start.sh"] in copies
    command = _all(instructions, "CMD")[-1].arguments
    assert command == '["/hctl-start.sh"]'


def test_everything_copied_passes_the_dockerignore(instructions: list[Instruction]) -> None:
    """Each COPY source exists and is not excluded from the build context."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def included(path: str) -> bool:
        result = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            body = pattern.lstrip("!")
            if fnmatch.fnmatch(path, body) or path.startswith(body.rstrip("/") + "/"):
                result = negated
        return result

    for instruction in _all(instructions, "COPY"):
        *sources, _destination = instruction.arguments.split()
        for source in sources:
            assert (REPO_ROOT / source).exists(), source
            assert included(source), f"{source} is excluded by {DOCKERIGNORE.name}"
    assert not included(".venv") and not included("tests")


# --- the start script, run for real ---------------------------------------------------------------


@pytest.fixture()
def stand_in_bin(tmp_path: Path) -> Path:
    """`ssh-keygen`, `service` and `sshd` that only record how they were called."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("ssh-keygen", "service", "sshd"):
        script = folder / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/calls"\n')
        script.chmod(0o755)
    return folder


def _run_start_function(
    function: str, tmp_path: Path, bin_folder: Path, **environment: str
) -> subprocess.CompletedProcess[str]:
    home = tmp_path / "root"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": f"{bin_folder}:{os.environ['PATH']}",
        "HOME": str(home),
        "RP_ENVIRONMENT_FILE": str(tmp_path / "rp_environment"),
        "SSHD_PRIVILEGE_DIR": str(tmp_path / "run-sshd"),
        **environment,
    }
    return subprocess.run(
        ["bash", "-c", f'source "{START_SCRIPT}" && {function}'],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_start_script_installs_public_keys_once_and_starts_sshd(
    tmp_path: Path, stand_in_bin: Path
) -> None:
    keys = "ssh-ed25519 AAAAfirst laptop\nssh-ed25519 AAAAsecond other"
    for _ in range(2):  # a restarted container must not add the keys again
        _run_start_function("setup_ssh", tmp_path, stand_in_bin, PUBLIC_KEY=keys)
    authorized = tmp_path / "root" / ".ssh" / "authorized_keys"
    assert authorized.read_text().splitlines() == keys.splitlines()
    assert authorized.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "root" / ".ssh").stat().st_mode & 0o777 == 0o700
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls.count("ssh-keygen -A") == 2
    assert calls.count("service ssh start") == 2
    assert (tmp_path / "run-sshd").is_dir()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("value", ["", "null"])
def test_start_script_without_a_key_starts_no_sshd(
    tmp_path: Path, stand_in_bin: Path, value: str
) -> None:
    result = _run_start_function("setup_ssh", tmp_path, stand_in_bin, PUBLIC_KEY=value)
    assert "no PUBLIC_KEY" in result.stdout
    assert not (tmp_path / "calls").exists()
    assert (tmp_path / "root" / ".ssh" / "authorized_keys").read_text() == ""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_start_script_exports_the_environment_for_ssh_sessions(
    tmp_path: Path, stand_in_bin: Path
) -> None:
    bashrc = tmp_path / "root" / ".bashrc"
    bashrc.parent.mkdir()
    bashrc.write_text("case $- in *i*) ;; *) return;; esac\n")
    for _ in range(2):
        _run_start_function(
            "export_environment",
            tmp_path,
            stand_in_bin,
            HF_HOME="/workspace/.cache/huggingface",
            ODD_VALUE="a b'c",
            PUBLIC_KEY="ssh-ed25519 AAAAsecret",
        )
    exported = (tmp_path / "rp_environment").read_text()
    assert "PUBLIC_KEY" not in exported
    lines = bashrc.read_text().splitlines()
    assert lines[0].endswith(f". {tmp_path / 'rp_environment'}"), "must run before the early return"
    assert len([line for line in lines if "rp_environment" in line]) == 1
    # A non-interactive shell that sources the file sees the container's values exactly.
    shown = subprocess.run(
        [
            "bash",
            "-c",
            f'. "{tmp_path / "rp_environment"}"; printf "%s|%s" "$HF_HOME" "$ODD_VALUE"',
        ],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown == "/workspace/.cache/huggingface|a b'c"


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid")
def test_start_script_starts_the_lease_watchdog_from_the_pods_environment(
    tmp_path: Path, stand_in_bin: Path
) -> None:
    import json
    import sys
    import time

    marker = tmp_path / "stopped"
    lease_file = tmp_path / "volume" / "hctl" / "lease.json"
    _run_start_function(
        "start_lease_watchdog", tmp_path, stand_in_bin,
        HCTL_PYTHON=sys.executable, HCTL_LEASE_UNTIL=f"{time.time() + 1:.0f}",
        HCTL_LEASE_COMMAND=f"echo stop > {marker}", HCTL_LEASE_FILE=str(lease_file),
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.read_text() == "stop\n"
    assert json.loads(lease_file.read_text())["command"] == f"echo stop > {marker}"
    # Without a lease in the environment nothing starts.
    quiet = _run_start_function("start_lease_watchdog", tmp_path, stand_in_bin)
    assert "watchdog" not in quiet.stdout
