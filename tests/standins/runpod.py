"""pytest fixtures for the RunPod emulators: REST v2 (`runpod_rest_emulator.py`, hctl's default
provider) and GraphQL (`runpod_emulator.py`, provider runpod-graphql), two front ends of one
emulated account (`runpod_cloud.py`).

Each is a real HTTP server on 127.0.0.1, started per test in a thread. Fixtures:

- `runpod_emulator` — parametrised: every test that takes it runs once against each API
  ("rest", "graphql"). `hctl_runpod_env` is the same, with `.env()` applied to `os.environ`.
- `rest_emulator` / `hctl_rest_env` — the REST v2 API only (the default provider: end-to-end
  tests use it). `graphql_emulator` — the GraphQL API only (raw GraphQL documents, RunPod's SDK).

What they offer (both APIs alike):
- `.api` ("rest" / "graphql"), `.url` (REST: the base address; GraphQL: the `/graphql` endpoint),
  `.api_key` — the one account key (any other answers 401); `.pod_key(pod_id)` — the pod-scoped
  key RunPod gives a pod (RUNPOD_API_KEY there), which may act on that pod only.
- `.pods` — a snapshot of the pod table: dicts with `id`, `name`, `status` ("RUNNING" /
  "EXITED"), `gpuTypeId`, `cloudType` (where it landed), `podType`, `costPerHr`, `env` (dict),
  `ports` ("22/tcp,8888/http"), `imageName`, `containerDiskInGb`, `volumeInGb`,
  `volumeMountPath`, `bidPerGpu`, `stopAfter`, `terminateAfter`, `allowedCudaVersions`,
  `cudaVersion` (the host's), `globalNetworking`, `podHostId`, `publicPort`; terminated pods are
  gone. `.pod(pod_id)` → one dict or None.
- `.ready_after_polls` (int, default 1) — how many reads of a new or started pod show it still
  starting. Set it before creating the pod.
- `.inject_fault(kind, *, operation=None, times=1, status=500, retry_after=None, message="",
  delay_s=0)` — the next `times` requests (for one operation, or any) fail. Operations: "gpus",
  "list", "get", "create", "stop", "start", "terminate", "keys", "set_keys", "billing". Kinds:
  "unauthorized" (401), "bad_request" (400), "rate_limited" (429 + Retry-After, default 1 s),
  "server_error" (HTTP `status`), "capacity" (RunPod's "There are no longer any instances
  available..."), "something_went_wrong" (RunPod's generic failure), "resolver_error" (a refusal
  saying `message`), "drop_after_apply" (applied, then the connection closes unanswered),
  "drop_before_apply", "slow" (RunPod works `delay_s` seconds, then applies and answers).
- `.set_stock(gpu_id, None | "Low" | "Medium" | "High", cloud=None | "SECURE" | "COMMUNITY")`;
  `.catalogue` is the list of `CatalogueGpu` (prices per GPU-hour, hosts' CUDA versions).
- `.route_ssh(direct=("127.0.0.1", port), pod_host_id="root")` — point every pod's SSH endpoints
  at something real. Pair it with `HCTL_SSH_PROXY_HOST/PORT`. `each=[(ip, port), ...]` gives
  the pods created next one address each, in turn (several stand-in pods).
- `.cloud.port_offset` (REST: TCP port P other than 22 is public at P + offset, default 40000),
  `.cloud.private_ip` (the address `globalNetworking` gives), `.cloud.global_networking_offered`
  (False: the data centre has no private network, the pods come without it).
- `.add_pod(name=..., status="RUNNING", ready=True, env=None, spot=False)` — a pod made elsewhere.
- `.pub_key` — the account's SSH keys, one per line; settable.
- `.requests` / `.requests_for("create")` — what was sent (`.operation`, `.api_operations`,
  `.body` (GraphQL variables or the REST JSON body), `.auth` "bearer"/"query"/"pod"/"none",
  `.status`).
- `.elapse(seconds)` — emulated time passes (running pods bill).
- `.env()` — the environment that points hctl (in-process or a subprocess) at it, with no real
  waiting (`HCTL_READY_POLL_INTERVAL_S=0`, `HCTL_API_BACKOFF_S=0`, `HCTL_CREATE_GRACE_S=0`).
- REST only: `.invalid_requests` / `.invalid_responses` — what did not conform to RunPod's
  OpenAPI document. The fixtures fail a test that leaves either non-empty.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.standins.emulator_http import EmulatorServer
from tests.standins.runpod_emulator import RunPodEmulator
from tests.standins.runpod_rest_emulator import RunPodRestEmulator

APIS = {"rest": RunPodRestEmulator, "graphql": RunPodEmulator}


def _serve(api: str) -> Iterator[EmulatorServer]:
    with APIS[api]() as emulator:
        yield emulator
        if isinstance(emulator, RunPodRestEmulator):
            assert emulator.invalid_responses == [], "the emulator broke RunPod's document"
            assert emulator.invalid_requests == [], "requests RunPod's document refuses"


def _point_hctl_at(emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> EmulatorServer:
    for name, value in emulator.env().items():
        monkeypatch.setenv(name, value)
    return emulator


@pytest.fixture(params=sorted(APIS, reverse=True))
def runpod_emulator(request: pytest.FixtureRequest) -> Iterator[EmulatorServer]:
    """A fresh emulator for one test, once per RunPod API."""
    yield from _serve(request.param)


@pytest.fixture
def rest_emulator() -> Iterator[RunPodRestEmulator]:
    """RunPod's REST v2 API (the default provider) for one test."""
    yield from _serve("rest")  # type: ignore[misc]


@pytest.fixture
def graphql_emulator() -> Iterator[RunPodEmulator]:
    """RunPod's GraphQL API for one test."""
    yield from _serve("graphql")  # type: ignore[misc]


@pytest.fixture
def hctl_runpod_env(
    runpod_emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> EmulatorServer:
    """The emulator (each API in turn), with hctl's environment pointing at it."""
    return _point_hctl_at(runpod_emulator, monkeypatch)


@pytest.fixture
def hctl_rest_env(
    rest_emulator: RunPodRestEmulator, monkeypatch: pytest.MonkeyPatch
) -> RunPodRestEmulator:
    """The REST v2 emulator, with hctl's environment pointing at it."""
    return _point_hctl_at(rest_emulator, monkeypatch)  # type: ignore[return-value]
