"""pytest fixtures for the RunPod emulator (`tests/standins/runpod_emulator.py`).

The emulator is a real HTTP server on 127.0.0.1 executing RunPod's GraphQL API (graphql-core),
started per test in a thread (about a millisecond). Fixture API:

`runpod_emulator` (function scope) → a `RunPodEmulator`:
- `.url` — the GraphQL endpoint (`http://127.0.0.1:<port>/graphql`); `.base_url` without `/graphql`.
- `.api_key` — the one key it accepts (any other, or none, answers HTTP 401).
- `.pods` — a snapshot of the pod table: a list of dicts (`id`, `name`, `status`, `gpuTypeId`,
  `cloudType`, `podType`, `costPerHr`, `env` (dict), `ports`, `imageName`, `containerDiskInGb`,
  `volumeInGb`, `volumeMountPath`, `bidPerGpu`, `stopAfter`, `terminateAfter`, `podHostId`,
  `publicPort`); terminated pods are gone. `.pod(pod_id)` → one dict or None.
- `.ready_after_polls` (int, default 1) — how many reads of a new or resumed pod answer
  `runtime: null` before it is reachable. Set it before creating the pod.
- `.inject_fault(kind, *, operation=None, times=1, status=500, retry_after=None, message="", delay_s=0)` — the next
  `times` requests (for one root field such as "podFindAndDeployOnDemand", or any) fail. Kinds:
  "unauthorized" (401), "bad_request" (400), "rate_limited" (429 + Retry-After, default 1 s),
  "server_error" (HTTP `status`), "capacity" (RunPod's "There are no longer any instances
  available..." resolver error), "something_went_wrong" (INTERNAL_SERVER_ERROR), "drop_after_apply"
  (the create/stop/... is applied, then the connection closes unanswered), "drop_before_apply",
  "resolver_error" (HTTP 200 with `errors[0].message == message`, e.g. RunPod's "There are not
  enough free GPUs on the host machine to start this pod."), "slow" (answered after `delay_s`).
- `.set_stock(gpu_id, None | "Low" | "Medium" | "High")` — None makes creates of that GPU fail with
  the capacity error. `.catalogue` is the list of `CatalogueGpu` (prices per GPU-hour).
- `.route_ssh(direct=("127.0.0.1", port), pod_host_id="root")` — point the SSH endpoints every pod
  reports at something real: privatePort 22 → that public ip/port (stays put across resumes), and
  `machine.podHostId` (the proxy user) → that name. Pair it with `HCTL_SSH_PROXY_HOST/PORT`.
- `.add_pod(name=..., status="RUNNING", ready=True, env=None, spot=False)` — a pod made elsewhere.
- `.pub_key` — the account's `myself.pubKey` (newline-separated keys); settable.
- `.requests` / `.requests_for("podFindAndDeployOnDemand")` — what was sent (root fields,
  variables, query, auth style "bearer"/"query"/"none", HTTP status).
- `.env()` — the environment variables that point hctl (in-process or a subprocess) at it.

`hctl_runpod_env` → the same emulator, with `.env()` already applied to `os.environ` (via
monkeypatch): `HCTL_RUNPOD_API_URL`, `RUNPOD_API_KEY`, and no real waiting
(`HCTL_READY_POLL_INTERVAL_S=0`, `HCTL_API_BACKOFF_S=0`). Use it for `CliRunner` tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.standins.runpod_emulator import RunPodEmulator


@pytest.fixture
def runpod_emulator() -> Iterator[RunPodEmulator]:
    """A fresh RunPod emulator on 127.0.0.1 for one test."""
    with RunPodEmulator() as emulator:
        yield emulator


@pytest.fixture
def hctl_runpod_env(
    runpod_emulator: RunPodEmulator, monkeypatch: pytest.MonkeyPatch
) -> RunPodEmulator:
    """The emulator, with hctl's environment pointing at it for the whole test."""
    for name, value in runpod_emulator.env().items():
        monkeypatch.setenv(name, value)
    return runpod_emulator
