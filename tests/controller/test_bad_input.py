"""Every impossible request is refused before anything starts or is rented, in two lines.

One table of bad inputs across `hctl` and `hctl-worker`. For each: a non-zero exit, exactly one
`error:` line naming the problem and one `hint:` line, no traceback; the RunPod emulator's pod
table empty and no create request in its log (REST v2, the default provider); no worker process and no job directory; and not one
file of the user's (the home folder with hctl's config, the working folder with their prompt and
config files, the download folders) created, changed or removed.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hctl.cli import app as hctl_app
from hctl_worker.cli import app as worker_app
from tests.conftest import REPO_ROOT

TINY = str(REPO_ROOT / "tests" / "fixtures" / "tiny-refuser")
LOCAL = [TINY, "--on", "local", "--yes"]
POD = [TINY, "--yes"]

# (program, arguments, a fragment of the error line)
CASES: list[tuple[str, list[str], str]] = [
    # hctl run: the search's size and the trial to keep
    ("hctl", ["run", *LOCAL, "--trials", "0"], "--trials must be at least 1"),
    ("hctl", ["run", *LOCAL, "--trials", "-3"], "--trials must be at least 1"),
    ("hctl", ["run", *LOCAL, "--trials", "abc"], "'--trials'"),
    ("hctl", ["run", *LOCAL, "--trial", "0"], "--trial 0 is not a trial number"),
    ("hctl", ["run", *LOCAL, "--trial", "-1"], "--trial -1 is not a trial number"),
    ("hctl", ["run", *LOCAL, "--trials", "5", "--trial", "99999"], "beyond the search's 5"),
    ("hctl", ["run", *LOCAL, "--trial", "300"], "beyond the search's 200"),
    ("hctl", ["run", *LOCAL, "--trials", "3", "--set", "n_trials=4"], "both set the number"),
    # hctl run: where it runs
    ("hctl", ["run", TINY, "--on", "ssh://bad", "--yes"], "Not an SSH address"),
    ("hctl", ["run", TINY, "--on", "ssh://root@host:99999", "--yes"], "Not an SSH address"),
    ("hctl", ["run", TINY, "--on", "mars", "--yes"], "not a target"),
    ("hctl", ["run", *LOCAL, "--gpu", "NVIDIA GeForce RTX 4090"], "--gpu only applies to a pod"),
    ("hctl", ["run", *LOCAL, "--spot"], "--spot only applies to a pod"),
    ("hctl", ["run", *LOCAL, "--keep"], "--keep only applies to a pod"),
    ("hctl", ["run", *POD, "--pod", "x", "--on", "local"], "cannot be used together"),
    ("hctl", ["run", *POD, "--output", "elsewhere"], "only applies to --on local"),
    ("hctl", ["run", *LOCAL, "--output", "taken.txt"], "is a file; the job needs a folder"),
    ("hctl", ["run", *POD, "--keep", "--terminate"], "contradict"),
    # hctl run: several pods
    ("hctl", ["run", *POD, "--pods", "0"], "--pods 0 is not a count"),
    ("hctl", ["run", *POD, "--pods", "1000"], "--pods 1000 is not a count"),
    ("hctl", ["run", *LOCAL, "--pods", "2"], "--pods only applies to a pod"),
    ("hctl", ["run", *POD, "--pod", "x", "--pods", "2"], "--pods only applies to a new pod"),
    (
        "hctl",
        [
            "run",
            *POD,
            "--params",
            "70B",
            "--pods",
            "2",
            "--gpus",
            "2",
            "--gpu",
            "NVIDIA GeForce RTX 4090",
        ],
        "2x RTX 4090 has 48 GB",
    ),  # fmt: skip
    ("hctl", ["run", *POD, "--gpu", "RTX 9999"], "RTX 9999"),
    ("hctl", ["run", *POD, "--pod", "no-such-pod"], "no-such-pod"),
    # hctl run: money
    ("hctl", ["run", *POD, "--max-cost", "nan"], "--max-cost nan is not a budget"),
    ("hctl", ["run", *POD, "--max-cost", "inf"], "--max-cost inf is not a budget"),
    ("hctl", ["run", *POD, "--max-cost", "-1"], "--max-cost -1 is not a budget"),
    ("hctl", ["run", *POD, "--max-cost", "0.0000001"], "above --max-cost"),
    # hctl run: the model
    ("hctl", ["run", "/nonexistent/model-folder", "--on", "local", "--yes"], "No model at"),
    ("hctl", ["run", "not a repo id!", "--yes"], "neither a model folder nor"),
    ("hctl", ["run", "some/model", "--params", "lots", "--yes"], "parameter count"),
    # hctl run: worker settings from the command line and from files
    ("hctl", ["run", *LOCAL, "--set", "no_such_setting=1"], "no_such_setting"),
    ("hctl", ["run", *LOCAL, "--set", "n_trials=abc"], "n_trials"),
    ("hctl", ["run", *LOCAL, "--set", "justtext"], "is not KEY=VALUE"),
    ("hctl", ["run", *LOCAL, "--set", "max_response_length=0"], "max_response_length"),
    ("hctl", ["run", *LOCAL, "--config", "missing.toml"], "does not exist"),
    ("hctl", ["run", *LOCAL, "--config", "malformed.toml"], "malformed.toml is not valid TOML"),
    ("hctl", ["run", *LOCAL, "--config", "unknown.toml"], "unknown.toml: unknown setting"),
    ("hctl", ["run", *LOCAL, "--config", "many.toml"], "n_trials"),
    # hctl run: prompt files
    ("hctl", ["run", *LOCAL, "--config", "empty-prompts.toml"], "no prompts in"),
    ("hctl", ["run", *LOCAL, "--config", "binary-prompts.toml"], "is a binary file"),
    ("hctl", ["run", *LOCAL, "--config", "long-prompts.toml"], "characters long"),
    ("hctl", ["run", *LOCAL, "--config", "missing-prompts.toml"], "does not exist"),
    # hctl run: where the model goes
    ("hctl", ["run", *POD, "--download", "taken.txt"], "is a file, not a folder"),
    ("hctl", ["run", *POD, "--download", "full"], "is not empty"),
    ("hctl", ["run", *POD, "--upload", "not a repo"], "is not a Hugging Face repo id"),
    # hctl estimate
    ("hctl", ["estimate", TINY, "--trials", "0"], "'--trials'"),
    ("hctl", ["estimate", TINY, "--gpu", "RTX 9999"], "RTX 9999"),
    ("hctl", ["estimate", TINY, "--response-tokens", "0"], "'--response-tokens'"),
    # hctl config
    ("hctl", ["config", "set", "runpod_api_url", "not a url"], "not a valid runpod_api_url"),
    ("hctl", ["config", "set", "runpod_rest_url", "ftp://x"], "not a valid runpod_rest_url"),
    ("hctl", ["config", "set", "volume_gb", "abc"], "not a valid volume_gb"),
    ("hctl", ["config", "set", "container_disk_gb", "5"], "not a valid container_disk_gb"),
    ("hctl", ["config", "set", "max_cost", "nan"], "not a valid max_cost"),
    ("hctl", ["config", "set", "frobnicate", "1"], "no setting called"),
    ("hctl", ["config", "set", "gpu"], "No value given for gpu"),
    # job ids
    ("hctl", ["results", "../jobs/0612-0930-a1b2"], "is not a job id"),
    ("hctl", ["logs", "/etc/passwd"], "is not a job id"),
    ("hctl", ["attach", "..", "--yes"], "is not a job id"),
    ("hctl", ["cancel", "../../x", "--yes"], "is not a job id"),
    ("hctl", ["resume", "0612-0930-a1b2", "--yes"], "No job '0612-0930-a1b2'"),
    # pods and machines
    ("hctl", ["gpus", "--cloud", "MOON"], "'--cloud'"),
    ("hctl", ["create-pod", "--env", "BAD", "--yes"], "is not KEY=VALUE"),
    ("hctl", ["create-pod", "--ports", "99999/tcp", "--yes"], "is not PORT/tcp"),
    ("hctl", ["create-pod", "--bid", "1", "--yes"], "--bid only applies to spot"),
    ("hctl", ["create-pod", "--container-disk", "99999999", "--yes"], "more than anyone means"),
    ("hctl", ["create-pod", "--volume", "5", "--yes"], "Volume 5 GB is out of range"),
    ("hctl", ["create-pod", "--max-hours", "nan", "--yes"], "nan is not a number"),
    ("hctl", ["create-pod", "--max-hours", "1000", "--yes"], "at most 720"),
    ("hctl", ["gpus", "--max-price", "nan"], "--max-price nan is not a price"),
    ("hctl", ["gpus", "--max-price", "-1"], "--max-price -1 is not a price"),
    ("hctl", ["gpus", "--min-vram", "-8"], "--min-vram -8 is negative"),
    ("hctl", ["create-pod", "--spot", "--bid", "0.2", "--yes"], "has no spot pods"),
    ("hctl", ["run", *LOCAL, "--upload", "alice/model"], "needs a Hugging Face token"),
    ("hctl", ["run", *POD, "--upload", "alice/model"], "needs a Hugging Face token"),
    ("hctl", ["exec", "ssh://root@127.0.0.1:9", "--timeout", "0", "--", "true"], "--timeout 0"),
    ("hctl", ["exec", "ssh://root@127.0.0.1:9", "--timeout", "nan", "--", "true"], "--timeout nan"),
    ("hctl", ["create-pod", "--image", "", "--yes"], "'' is not a container image"),
    ("hctl", ["create-pod", "--image", "my image:1", "--yes"], "is not a container image"),
    ("hctl", ["create-pod", "--terminate-at-limit", "--yes"], "--terminate-at-limit needs"),
    ("hctl", ["run", *POD, "--spot"], "has no spot pods"),
    ("hctl", ["stop-pod", "no-such-pod", "--yes"], "no-such-pod"),
    ("hctl", ["exec", "--", ""], "No command given"),
    ("hctl", ["forget-host", "[203.0.113.9]:22"], "No host key recorded under '[203.0.113.9]:22'"),
    ("hctl", ["monitor", "--interval", "0"], "'--interval'"),
    ("hctl", ["run", *LOCAL, "--frobnicate"], "No such option: --frobnicate"),
    ("hctl", ["frobnicate"], "No such command 'frobnicate'"),
    # hctl-worker
    ("worker", ["run", "--job-dir", "new-job", "--config", "/missing.toml"], "does not exist"),
    ("worker", ["run", "--job-dir", "new-job", "--config", "malformed.toml"], "not valid TOML"),
    ("worker", ["run", "--job-dir", "new-job", "--config", "unknown.toml"], "unknown setting"),
    ("worker", ["run", "--job-dir", "new-job", "--set", "n_trials=abc"], "n_trials"),
    ("worker", ["run", "--job-dir", "new-job", "--n-trials", "0"], "n_trials"),
    ("worker", ["run", "--job-dir", "new-job", "--n-trials", "many"], "'--n-trials'"),
    ("worker", ["run", "--job-dir", "new-job", "--set", "frobnicate=1"], "frobnicate"),
    ("worker", ["export", "--job-dir", "no-such-job", "--trial", "1"], "not a job directory"),
    ("worker", ["export", "--job-dir", "no-such-job"], "Missing option '--trial'"),
]


def test_hctl_worker_without_the_worker_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # as in a laptop install: not importable
    for module in ("job_directory", "study"):  # imported afresh, as in a new process
        monkeypatch.delitem(sys.modules, f"hctl_worker.{module}", raising=False)
        monkeypatch.delattr(f"hctl_worker.{module}", raising=False)
    result = CliRunner().invoke(worker_app, ["pareto", "--job-dir", str(tmp_path)])
    assert result.exit_code == 3, result.output
    assert "error: hctl-worker needs optuna" in result.output
    assert "pip install 'hctl[worker]'" in result.output and "Traceback" not in result.output


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and "hf-home" not in path.parts:
            files[str(path.relative_to(root))] = (
                path.stat().st_mtime_ns,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
        elif path.is_dir():
            files[str(path.relative_to(root)) + "/"] = (0, "")
    return files


def _workers_under(root: Path) -> list[str]:
    """Command lines of running processes that mention `root` (a worker would)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(root) in command and int(entry.name) != os.getpid():
                found.append(command)
    return found


@pytest.fixture
def user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's working folder with the files the bad inputs name."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "malformed.toml").write_text('n_trials = 5\n[good_prompts\ndataset = "x"\n')
    (folder / "unknown.toml").write_text("frobnicate = 1\n")
    (folder / "many.toml").write_text('n_trials = "many"\n')
    (folder / "empty.txt").write_text("\n\n   \n")
    (folder / "binary.txt").write_bytes(b"\x00\x01\x02 PK\x03\x04" * 100)
    (folder / "long.txt").write_text("How do I " + "really " * 20_000 + "\n")
    for name, prompts in (("empty", "empty.txt"), ("binary", "binary.txt"),
                          ("long", "long.txt"), ("missing", "./nope.txt")):  # fmt: skip
        (folder / f"{name}-prompts.toml").write_text(f'[bad_prompts]\ndataset = "{prompts}"\n')
    (folder / "taken.txt").write_text("the user's own file\n")
    (folder / "full").mkdir()
    (folder / "full" / "keep.txt").write_text("the user's own file\n")
    monkeypatch.chdir(folder)
    monkeypatch.setenv("COLUMNS", "80")
    return folder


def test_the_table_holds_at_least_forty_bad_inputs_across_both_programs() -> None:
    assert len(CASES) >= 40
    assert {program for program, _, _ in CASES} == {"hctl", "worker"}


@pytest.mark.parametrize(
    ("program", "arguments", "fragment"),
    # hctl-worker's rows need the worker extra: a laptop install answers every one of them with
    # the install hint instead (see the test above).
    [
        pytest.param(*case, marks=[pytest.mark.worker] if case[0] == "worker" else [])
        for case in CASES
    ],
    ids=[f"{program}:{' '.join(arguments)}"[:90] for program, arguments, _ in CASES],
)
def test_a_bad_input_is_refused_in_two_lines_before_anything_happens(
    hctl_rest_env, user_folder: Path, tmp_path: Path, program: str, arguments, fragment: str
) -> None:
    before = _snapshot(tmp_path)
    application = hctl_app if program == "hctl" else worker_app
    result = CliRunner().invoke(application, arguments)
    output = result.output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    hints = [line for line in output.splitlines() if line.startswith("hint:")]
    assert result.exit_code not in (0, None), output
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), repr(result.exception)
    assert len(errors) == 1 and len(hints) == 1, output
    assert fragment in errors[0], output
    assert "Traceback" not in output
    assert hctl_rest_env.pods == [] and hctl_rest_env.requests_for("create") == []
    assert _workers_under(tmp_path) == []
    assert _snapshot(tmp_path) == before
