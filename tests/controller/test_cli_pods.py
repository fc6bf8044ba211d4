"""The pod commands as a user runs them, against the RunPod emulators (each test runs once per
API: REST v2, the default provider, and GraphQL).

Every scenario ends by checking the emulator's pod table: exactly the pods it meant to leave.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import paramiko
import pytest
from typer.testing import CliRunner, Result

from hctl.cli import app
from tests.standins.emulator_http import EmulatorServer as RunPodEmulator
from tests.standins.sshd import SshdServer, stop_watchdog


@pytest.fixture
def emulator(hctl_runpod_env: RunPodEmulator, monkeypatch: pytest.MonkeyPatch) -> RunPodEmulator:
    monkeypatch.setenv("COLUMNS", "200")  # wide tables, so ids are on one line
    return hctl_runpod_env


def hctl(*arguments: str, input: str | None = None) -> Result:
    return CliRunner().invoke(app, list(arguments), input=input)


def assert_clean_error(result: Result, exit_code: int, *fragments: str) -> None:
    """A one-line error and a hint, the documented exit code, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert "error:" in result.output and "hint:" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_every_command_has_help() -> None:
    for command in ("gpus", "create-pod", "list-pods", "start-pod", "stop-pod", "terminate-pod",
                    "ssh-key", "config"):  # fmt: skip
        result = hctl(command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output, command
    assert "--max-hours" in hctl("create-pod", "--help").output


def test_gpus_lists_prices_and_stock_with_filters(emulator: RunPodEmulator) -> None:
    table = hctl("gpus")
    assert table.exit_code == 0
    assert "NVIDIA GeForce RTX 4090" in table.output and "$0.44" in table.output
    assert "unknown" not in table.output
    listed = json.loads(hctl("gpus", "--json", "--in-stock", "--min-vram", "40").output)
    assert [gpu["id"] for gpu in listed] == [
        "NVIDIA RTX A6000", "NVIDIA L40S", "NVIDIA H100 PCIe",
    ]  # fmt: skip
    cheap = json.loads(hctl("gpus", "--json", "--max-price", "0.3", "--cloud", "SECURE").output)
    assert cheap == []
    community = json.loads(
        hctl("gpus", "--json", "--max-price", "0.3", "--cloud", "community").output
    )
    assert [gpu["id"] for gpu in community] == ["NVIDIA RTX A4000", "NVIDIA GeForce RTX 3090"]
    assert emulator.pods == []


def test_create_pod_with_the_owners_defaults(emulator: RunPodEmulator, tmp_path: Path) -> None:
    result = hctl("create-pod", "--yes", "--env", "HF_TOKEN=hf_x")
    assert result.exit_code == 0, result.output
    assert "$0.31/h" in result.output and "bills until you stop it" in result.output
    assert "note:" not in result.output  # it costs what was quoted
    (pod,) = emulator.pods
    assert pod["name"].startswith("hctl-")
    assert pod["gpuTypeId"] == "NVIDIA GeForce RTX 4090"
    assert pod["imageName"].startswith("runpod/pytorch:")
    assert (pod["containerDiskInGb"], pod["volumeInGb"], pod["volumeMountPath"]) == (
        40, 50, "/workspace",
    )  # fmt: skip
    assert pod["ports"] == "22/tcp" and not pod["stopAfter"] and not pod["terminateAfter"]
    assert pod["cloudType"] == "COMMUNITY"  # the cloud of the $0.31 quote, not "either"
    assert pod["allowedCudaVersions"][0] == "12.8"  # the image is built for CUDA 12.8
    assert pod["env"]["HF_HOME"] == "/workspace/.cache/huggingface"
    assert pod["env"]["PIP_CACHE_DIR"] == "/workspace/.cache/pip"
    assert pod["env"]["HF_TOKEN"] == "hf_x"
    # hctl made its key and handed it to the pod.
    key_path = tmp_path / "home" / ".ssh" / "id_ed25519"
    public = key_path.with_name("id_ed25519.pub").read_text().split()
    assert pod["env"]["PUBLIC_KEY"].split()[:2] == public[:2]
    assert pod["id"] in result.output and f"hctl terminate-pod {pod['id']}" in result.output


def test_create_pod_with_options_and_wait(emulator: RunPodEmulator) -> None:
    emulator.ready_after_polls = 2
    emulator.pub_key = "ssh-rsa AAAAB3Nz other-laptop"
    result = hctl(
        "create-pod", "NVIDIA RTX A6000", "--yes", "--wait", "--cloud", "SECURE",
        "--image", "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04",
        "--container-disk", "60", "--volume", "0", "--name", "bench", "--ports", "8888/http",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (pod,) = emulator.pods
    assert pod["name"] == "hctl-bench" and pod["cloudType"] == "SECURE"
    assert pod["costPerHr"] == 0.76 and pod["volumeInGb"] == 0 and pod["containerDiskInGb"] == 60
    assert pod["ports"] == "22/tcp,8888/http"
    assert pod["allowedCudaVersions"][0] == "12.4"  # the image says cuda12.4.1
    assert "other-laptop" in pod["env"]["PUBLIC_KEY"]  # the account's keys keep working
    assert "is reachable" in result.output
    assert f"direct: root@213.173.108.12 -p {pod['publicPort']}" in result.output


def test_create_spot_pod_needs_a_bid_and_says_which_api_it_uses(emulator: RunPodEmulator) -> None:
    assert_clean_error(hctl("create-pod", "--spot", "--yes"), 2, "needs a bid")
    result = hctl("create-pod", "--spot", "--bid", "0.22", "--yes")
    if emulator.api == "rest":  # REST v2 has no spot pods: say where they are, until when
        assert_clean_error(result, 2, "no spot pods", "HCTL_PROVIDER=runpod-graphql", "early 2027")
        assert emulator.requests_for("create") == []
        return
    assert result.exit_code == 0, result.output
    assert "GraphQL API, which RunPod retires early 2027" in result.output
    (pod,) = emulator.pods
    assert pod["podType"] == "INTERRUPTABLE" and pod["bidPerGpu"] == 0.22


@pytest.mark.parametrize(
    ("arguments", "exit_code", "fragments"),
    [
        (["RTX 4099"], 2, ["no GPU type 'RTX 4099'", '"NVIDIA GeForce RTX 4090"']),
        (["H100"], 2, ["2 GPU types match 'H100'", '"NVIDIA H100 PCIe"']),
        (["--container-disk", "-5"], 2, ["Container disk -5 GB is too small"]),
        (["--container-disk", "99999999"], 2, ["99999999 GB is more than anyone means"]),
        (["--volume", "5"], 2, ["Volume 5 GB is out of range"]),
        (["--max-hours", "nan"], 2, ["nan is not a number"]),
        (["--volume", "-1"], 2, ["Volume -1 GB is negative"]),
        (["--env", "NOVALUE"], 2, ["--env 'NOVALUE' is not KEY=VALUE"]),
        (["--env", "1BAD=x"], 2, ["is not KEY=VALUE"]),
        (["--ports", "22/udp"], 2, ["Port '22/udp'"]),
        (["--max-hours", "0"], 2, ["--max-hours 0 must be more than 0"]),
        (["--bid", "0.3"], 2, ["--bid only applies to spot pods"]),
        (["--name", "bad name!"], 2, ["Pod name 'bad name!' is not allowed"]),
        (["NVIDIA H100 80GB HBM3", "--cloud", "COMMUNITY"], 2, ["not offered on demand"]),
    ],
)
def test_create_pod_refuses_bad_input(
    emulator: RunPodEmulator, arguments: list[str], exit_code: int, fragments: list[str]
) -> None:
    assert_clean_error(hctl("create-pod", "--yes", *arguments), exit_code, *fragments)
    assert emulator.requests_for("create") == []
    assert emulator.pods == []


def test_create_pod_asks_first_and_creates_nothing_when_not_confirmed(
    emulator: RunPodEmulator,
) -> None:
    result = hctl("create-pod", input="y\n")  # no terminal: hctl never spends money unasked
    assert_clean_error(result, 130, "Create this pod for about $0.31/h?", "--yes")
    assert "Price: $0.31/h" in result.output
    assert emulator.pods == []


def test_create_pod_refuses_a_name_in_use(emulator: RunPodEmulator) -> None:
    emulator.add_pod(name="hctl-taken")
    assert_clean_error(hctl("create-pod", "--yes", "--name", "taken"), 2, "exists already")
    assert [pod["name"] for pod in emulator.pods] == ["hctl-taken"]


# What each API's failure looks like to the user (REST: problem documents; GraphQL: envelopes).
GENERIC = {
    "graphql": "generic error: Something went wrong",
    "rest": "RunPod's API failed (HTTP 500)",
}
BAD_REQUEST = {
    "graphql": "rejected hctl's request as invalid",
    "rest": "request could not be processed",
}


@pytest.mark.parametrize(
    ("fault", "options", "exit_code", "fragments"),
    [
        ("unauthorized", {}, 3, ["rejected the API key", "hctl config set runpod_api_key"]),
        ("bad_request", {}, 1, [BAD_REQUEST]),
        ("capacity", {"operation": "create"}, 4, ["In stock: RTX A4000"]),
        ("something_went_wrong", {"times": 20}, 1, [GENERIC]),
        ("server_error", {"times": 20, "status": 502}, 1, ["HTTP 502"]),
        ("rate_limited", {"times": 20, "retry_after": 0}, 1, ["HTTP 429"]),
        *[
            (fault, {"times": 20, "operation": "create", "retry_after": 0}, 1, [text])
            for fault, text in [
                ("something_went_wrong", GENERIC),
                ("server_error", "HTTP 500"),
                ("rate_limited", "HTTP 429"),
                ("drop_before_apply", "Cannot reach RunPod's API"),
            ]
        ],
    ],
)
def test_create_pod_faults_end_in_a_clear_error_and_no_pod(
    emulator: RunPodEmulator, fault: str, options: dict, exit_code: int, fragments: list
) -> None:
    emulator.inject_fault(fault, **options)  # type: ignore[arg-type]
    texts = [text[emulator.api] if isinstance(text, dict) else text for text in fragments]
    assert_clean_error(hctl("create-pod", "--yes"), exit_code, *texts)
    assert emulator.pods == []


@pytest.mark.parametrize(
    ("fault", "options"),
    [
        ("drop_after_apply", {}),
        ("something_went_wrong", {}),
        ("server_error", {"status": 503}),
        ("rate_limited", {"retry_after": 0}),
    ],
)
def test_create_pod_survives_transient_faults_with_exactly_one_pod(
    emulator: RunPodEmulator, fault: str, options: dict
) -> None:
    emulator.inject_fault(fault, operation="create", **options)  # type: ignore[arg-type]
    result = hctl("create-pod", "--yes")
    assert result.exit_code == 0, result.output
    assert len(emulator.pods) == 1
    assert len(emulator.requests_for("create")) == (1 if fault == "drop_after_apply" else 2)


def test_missing_or_wrong_key(emulator: RunPodEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNPOD_API_KEY")
    assert_clean_error(hctl("list-pods"), 3, "No RunPod API key is set", "RUNPOD_API_KEY")
    assert emulator.requests == []
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_not_the_right_one")
    assert_clean_error(hctl("create-pod", "--yes"), 3, "RunPod rejected the API key (HTTP 401)")
    assert "rpa_not_the_right_one" not in hctl("list-pods").output  # secrets never printed
    assert emulator.pods == []


def test_list_pods_shows_status_price_uptime_and_both_endpoints(emulator: RunPodEmulator) -> None:
    assert "No pods" in hctl("list-pods").output
    emulator.route_ssh(direct=("127.0.0.1", 2222))
    ready = emulator.add_pod(name="hctl-ready")
    stopped = emulator.add_pod(name="hctl-stopped", status="EXITED", gpu_type_id="NVIDIA L40S")
    table = hctl("list-pods")
    assert table.exit_code == 0, table.output
    for fragment in (ready["id"], "running", "$0.31", "proxy: " + ready["podHostId"] + "@ssh.runpod.io -p 22",
                     "direct: root@127.0.0.1 -p 2222", stopped["id"], "stopped", "L40S"):  # fmt: skip
        assert fragment in table.output, fragment
    listed = {pod["name"]: pod for pod in json.loads(hctl("list-pods", "--json").output)}
    assert listed["hctl-ready"]["ready"] is True and listed["hctl-stopped"]["ready"] is False
    assert listed["hctl-ready"]["ssh"][1] == {
        "kind": "direct", "user": "root", "host": "127.0.0.1", "port": 2222,
    }  # fmt: skip
    assert len(emulator.pods) == 2


def test_list_pods_retries_server_errors(emulator: RunPodEmulator) -> None:
    emulator.inject_fault("server_error", status=503, times=2)
    emulator.inject_fault("something_went_wrong")
    assert hctl("list-pods").exit_code == 0
    assert emulator.pods == []


def test_create_pod_wait_is_bounded_and_leaves_the_choice_to_the_user(
    emulator: RunPodEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator.ready_after_polls = 10**6  # an image that never finishes pulling
    monkeypatch.setenv("HCTL_READY_TIMEOUT_S", "0.2")
    monkeypatch.setenv("HCTL_READY_POLL_INTERVAL_S", "0.05")
    result = hctl("create-pod", "--yes", "--wait")
    (pod,) = emulator.pods
    assert_clean_error(result, 6, "was not reachable after", f"hctl terminate-pod {pod['id']}")
    assert pod["status"] == "RUNNING"  # still there: create-pod says so, the user decides


def test_a_subprocess_reaches_the_emulator_through_its_environment(
    runpod_emulator: RunPodEmulator,
) -> None:
    runpod_emulator.add_pod(name="hctl-seen-from-outside")
    environment = {**os.environ, **runpod_emulator.env()}
    completed = subprocess.run(
        [sys.executable, "-c", "from hctl.cli import main; main()", "list-pods", "--json"],
        env=environment, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert [pod["name"] for pod in json.loads(completed.stdout)] == ["hctl-seen-from-outside"]


def test_stop_start_terminate_the_only_pod(emulator: RunPodEmulator) -> None:
    emulator.ready_after_polls = 1
    hctl("create-pod", "--yes")
    (pod,) = emulator.pods
    stopped = hctl("stop-pod", "--yes")
    assert stopped.exit_code == 0, stopped.output
    assert "keeps the volume" in stopped.output and emulator.pod(pod["id"])["status"] == "EXITED"
    stop_requests = len(emulator.requests_for("stop"))
    again = hctl("stop-pod", pod["id"], "--yes")  # says so, sends nothing
    assert (again.exit_code, again.output.splitlines()[0]) == (
        0, f"{pod['name']} ({pod['id']}) is stopped already: its GPU is not billing. "
        f"`hctl terminate-pod {pod['id']}` deletes its volume too.",
    )  # fmt: skip
    assert len(emulator.requests_for("stop")) == stop_requests
    started = hctl("start-pod", "--wait")
    assert started.exit_code == 0, started.output
    new_port = emulator.pod(pod["id"])["publicPort"]
    assert new_port != pod["publicPort"] and f"-p {new_port}" in started.output
    terminated = hctl("terminate-pod", "-y")
    assert terminated.exit_code == 0 and "Nothing more is billed" in terminated.output
    assert emulator.pods == []


def test_pod_commands_ask_and_choose_carefully(emulator: RunPodEmulator) -> None:
    first = emulator.add_pod(name="hctl-one")
    emulator.add_pod(name="hctl-two")
    emulator.add_pod(name="someone-elses")
    assert_clean_error(hctl("stop-pod", "--yes"), 2, "2 running hctl pods", "hctl-one", "hctl-two")
    assert_clean_error(hctl("terminate-pod", first["id"]), 130, "Terminate hctl-one")
    assert_clean_error(hctl("stop-pod", "hctl-nope", "--yes"), 5, "No pod with the id or name")
    assert_clean_error(hctl("start-pod"), 5, "no stopped hctl pod")
    assert hctl("terminate-pod", "hctl-one", "--yes").exit_code == 0
    assert sorted(pod["name"] for pod in emulator.pods) == ["hctl-two", "someone-elses"]


def test_ssh_key_generates_once_and_registers_without_dropping_keys(
    emulator: RunPodEmulator, tmp_path: Path
) -> None:
    emulator.pub_key = "ssh-rsa AAAAB3NzaC1 work-laptop"
    first = hctl("ssh-key")
    assert first.exit_code == 0, first.output
    key_path = tmp_path / "home" / ".ssh" / "id_ed25519"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    loaded = paramiko.Ed25519Key.from_private_key_file(str(key_path))
    public = key_path.with_name("id_ed25519.pub").read_text().split()
    assert public[:2] == [loaded.get_name(), loaded.get_base64()]
    keys = [line for line in emulator.pub_key.splitlines() if line.strip()]
    assert keys[0] == "ssh-rsa AAAAB3NzaC1 work-laptop" and keys[1].split()[:2] == public[:2]
    # Again: same key, nothing added twice, even if the account's copy has another comment.
    emulator.pub_key = emulator.pub_key.replace(public[2], "renamed")
    before = emulator.pub_key
    again = hctl("ssh-key")
    assert "has it already" in again.output and emulator.pub_key == before
    assert paramiko.Ed25519Key.from_private_key_file(str(key_path)) == loaded  # not remade
    assert emulator.pods == []


def test_ssh_key_reports_an_unreadable_key(emulator: RunPodEmulator, tmp_path: Path) -> None:
    key_path = tmp_path / "home" / ".ssh" / "id_ed25519"
    key_path.parent.mkdir(parents=True)
    key_path.write_text("not a key")
    assert_clean_error(hctl("ssh-key"), 2, "Cannot read the SSH key")
    assert key_path.read_text() == "not a key"  # never overwritten


def test_start_pod_when_its_machine_has_no_free_gpu(emulator: RunPodEmulator) -> None:
    stopped = emulator.add_pod(name="hctl-tied", status="EXITED")
    emulator.inject_fault(
        "resolver_error",
        operation="start",
        message="There are not enough free GPUs on the host machine to start this pod.",
    )
    assert_clean_error(hctl("start-pod"), 4, "its machine has no free GPU", "terminate it")
    assert emulator.pod(stopped["id"])["status"] == "EXITED"
    assert hctl("start-pod", "hctl-tied").exit_code == 0  # later it works
    again = hctl("start-pod", "hctl-tied")
    assert again.exit_code == 0 and "running already" in again.output
    assert [pod["status"] for pod in emulator.pods] == ["RUNNING"]


def test_a_wrong_api_address_is_named(
    emulator: RunPodEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    if emulator.api == "graphql":
        variable, wrong, nowhere = (
            "HCTL_RUNPOD_API_URL",
            emulator.base_url,
            "http://127.0.0.1:9/graphql",
        )
        missing = "There is no GraphQL API at"
    else:
        variable, wrong, nowhere = (
            "HCTL_RUNPOD_REST_URL",
            emulator.url + "/api",
            "http://127.0.0.1:9",
        )
        missing = "There is no RunPod REST API at"
    monkeypatch.setenv(variable, wrong)
    assert_clean_error(hctl("list-pods"), 1, missing, variable)
    monkeypatch.setenv(variable, nowhere)  # nothing listens there
    assert_clean_error(hctl("gpus"), 1, f"Cannot reach RunPod's API at {nowhere}")
    assert emulator.pods == []


def test_max_hours_is_a_deadline_someone_keeps(
    emulator: RunPodEmulator, sshd_pod: SshdServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """GraphQL: RunPod keeps it (terminateAfter). REST v2 has none: hctl waits for the pod and
    starts the pod's own watchdog over SSH (here the sshd stand-in is the pod)."""
    emulator.route_ssh(direct=(sshd_pod.host, sshd_pod.port))
    monkeypatch.setenv("HCTL_SSH_KEY", str(sshd_pod.client_key_path))
    volume = tmp_path / "volume"
    monkeypatch.setenv("HCTL_VOLUME_PATH", str(volume))
    result = hctl("create-pod", "--yes", "--max-hours", "2", "--terminate-at-limit")
    try:
        assert result.exit_code == 0, result.output
        (pod,) = emulator.pods
        if emulator.api == "graphql":
            assert pod["terminateAfter"].endswith("Z") and not pod["stopAfter"]
            assert "RunPod terminates it at" in result.output
            assert not (volume / "hctl" / "lease.json").exists()
            return
        assert "a watchdog on the pod" in result.output
        assert "Its lease watchdog runs on the pod" in result.output
        lease = json.loads((volume / "hctl" / "lease.json").read_text())
        assert lease["until"] == pytest.approx(float(pod["env"]["HCTL_LEASE_UNTIL"]), abs=1)
        assert '"terminate"' in lease["command"]
        pid = int((volume / "hctl" / "watchdog.pid").read_text())
        os.kill(pid, 0)  # running, in its own session: this command has ended
    finally:
        stop_watchdog(volume / "hctl")


def test_max_hours_on_a_pod_hctl_cannot_reach_ends_terminated_and_says_so(
    emulator: RunPodEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """REST v2: the deadline needs the pod's own watchdog, started over SSH. A pod whose SSH
    cannot be reached would bill with no deadline: it is terminated, and the error says so."""
    with socket.socket() as probe:  # a port nothing listens on: connections are refused at once
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    emulator.route_ssh(direct=("127.0.0.1", closed_port))
    monkeypatch.setenv("HCTL_SSH_PROXY_HOST", "127.0.0.1")
    monkeypatch.setenv("HCTL_SSH_PROXY_PORT", str(closed_port))
    monkeypatch.setenv("HCTL_VOLUME_PATH", str(tmp_path / "volume"))
    result = hctl("create-pod", "--yes", "--max-hours", "2")
    if emulator.api == "graphql":  # RunPod keeps the deadline itself: no SSH needed
        assert result.exit_code == 0, result.output
        return
    assert_clean_error(result, 6, "--max-hours watchdog", "Terminated hctl-", "not billing")
    assert emulator.pods == []  # the pod table: terminated, nothing left billing


def test_ctrl_c_or_end_of_input_at_a_question_is_interrupted_exit_130(
    emulator: RunPodEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A person at a terminal who answers a question with Ctrl-C (or Ctrl-D): as Ctrl-C
    anywhere else, not typer's "Aborted!" with exit 1."""
    from types import SimpleNamespace

    from hctl.cli import common

    pod = emulator.add_pod(name="hctl-asked")
    monkeypatch.setattr(common, "sys", SimpleNamespace(stdin=SimpleNamespace(isatty=lambda: True)))
    result = hctl("stop-pod", pod["id"], input="")
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "Aborted" not in result.output
    assert emulator.pod(pod["id"])["status"] == "RUNNING"


def test_a_stop_or_terminate_runpod_refuses_says_the_pod_still_bills(
    emulator: RunPodEmulator,
) -> None:
    pod = emulator.add_pod(name="hctl-stubborn")
    emulator.inject_fault("server_error", operation="stop", times=100, status=503)
    emulator.inject_fault("server_error", operation="terminate", times=100, status=502)
    for action in ("stop", "terminate"):
        result = hctl(f"{action}-pod", pod["id"], "--yes")
        assert_clean_error(
            result, 1, f"Could not {action} hctl-stubborn ({pod['id']}): RunPod's API failed",
            "It is still running and billing $0.", f"Then run `hctl {action}-pod {pod['id']}` again."
        )  # fmt: skip
    assert emulator.pod(pod["id"])["status"] == "RUNNING"
