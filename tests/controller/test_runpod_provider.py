"""Both RunPod providers against their emulators: retries, the create that is never sent twice,
errors, readiness, prices, CUDA, leases. Every test runs once per API (REST v2, GraphQL)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest

from hctl import pods
from hctl.errors import (
    ApiError,
    AuthError,
    CapacityError,
    ConfigError,
    PodNotFoundError,
    PodNotReadyError,
    UnknownGpuError,
)
from hctl.providers import PROVIDERS, make_provider
from hctl.providers.base import PodLease, PodSpec, PodStatus, Provider
from hctl.providers.runpod import RunPodGraphQLProvider, RunPodRestProvider
from hctl.settings import load_settings
from tests.standins.emulator_http import EmulatorServer

IMAGE = "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404"


class Sleeper:
    """Records the waits instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def settings_for(emulator: EmulatorServer, **overrides: object):  # noqa: ANN201
    where = (
        {"runpod_rest_url": emulator.url, "provider": "runpod"}
        if emulator.api == "rest"
        else {"runpod_api_url": emulator.url, "provider": "runpod-graphql"}
    )
    given = {"runpod_api_key": emulator.api_key, "create_grace_s": 0, **where, **overrides}
    return load_settings(**given)


def provider_for(
    emulator: EmulatorServer, sleeper: Sleeper | None = None, **overrides: object
) -> Provider:
    kind = RunPodRestProvider if emulator.api == "rest" else RunPodGraphQLProvider
    return kind(settings_for(emulator, **overrides), sleep=sleeper or Sleeper())


def spec(name: str = "hctl-test-1", gpu: str = "NVIDIA GeForce RTX 4090", **fields) -> PodSpec:  # noqa: ANN003
    return PodSpec(
        **{"name": name, "gpu_type_id": gpu, "image": IMAGE, "env": {"A": "1"}, **fields}
    )


def test_the_registry_has_both_apis_and_rest_is_the_default() -> None:
    assert set(PROVIDERS) == {"runpod", "runpod-graphql"}
    assert isinstance(make_provider(load_settings()), RunPodRestProvider)
    graphql = make_provider(load_settings(provider="runpod-graphql"))
    assert isinstance(graphql, RunPodGraphQLProvider)
    with pytest.raises(ConfigError, match="provider"):
        load_settings(provider="aws")


def test_values_travel_as_data_with_bearer_auth(runpod_emulator: EmulatorServer) -> None:
    provider = provider_for(runpod_emulator)
    quoted = 'a "quoted" value \\ with a backslash'
    pod = provider.create(spec(env={"NOTE": quoted}))
    assert runpod_emulator.pod(pod.id)["env"] == {"NOTE": quoted}
    (request,) = runpod_emulator.requests_for("create")
    assert request.auth == "bearer"
    if runpod_emulator.api == "graphql":  # values in variables, never in the document
        assert quoted not in request.query
        assert request.variables["input"]["env"][0]["value"] == quoted
    else:
        assert request.body["env"] == {"NOTE": quoted}


def test_missing_key_fails_before_any_request(runpod_emulator: EmulatorServer) -> None:
    provider = provider_for(runpod_emulator, runpod_api_key=None)
    with pytest.raises(AuthError, match="No RunPod API key"):
        provider.list()
    assert runpod_emulator.requests == []


def test_wrong_key_is_not_retried(runpod_emulator: EmulatorServer) -> None:
    sleeper = Sleeper()
    with pytest.raises(AuthError, match="rejected") as raised:
        provider_for(runpod_emulator, sleeper, runpod_api_key="rpa_wrong").list()
    assert "hctl config set runpod_api_key" in raised.value.hint
    assert len(runpod_emulator.requests) == 1 and sleeper.waits == []


def test_reads_retry_429_honouring_retry_after_and_5xx_with_backoff(
    runpod_emulator: EmulatorServer,
) -> None:
    sleeper = Sleeper()
    provider = provider_for(runpod_emulator, sleeper, api_backoff_s=2)
    runpod_emulator.inject_fault("rate_limited", retry_after=7)
    runpod_emulator.inject_fault("server_error", status=503, times=2)
    assert provider.list() == []
    assert sleeper.waits == [7, 4, 8]  # Retry-After, then backoff 2 s doubling per attempt


def test_a_request_that_times_out_is_retried(runpod_emulator: EmulatorServer) -> None:
    sleeper = Sleeper()
    # A timeout the unhindered retry meets even on a busy machine (0.2 s did not, once), and
    # a slow answer well past it.
    provider = provider_for(runpod_emulator, sleeper, api_timeout_s=1.5, api_retries=1)
    runpod_emulator.inject_fault("slow", delay_s=4.0)
    assert provider.list() == []
    assert len(sleeper.waits) == 1 and len(runpod_emulator.requests) == 2
    runpod_emulator.inject_fault("slow", delay_s=4.0, times=2)
    with pytest.raises(ApiError, match="did not answer in time"):
        provider.list()


def test_retries_are_bounded_and_end_in_a_clear_message(runpod_emulator: EmulatorServer) -> None:
    sleeper = Sleeper()
    provider = provider_for(runpod_emulator, sleeper, api_retries=2)
    runpod_emulator.inject_fault("something_went_wrong", times=10)
    expected = (
        "generic error: Something went wrong"
        if runpod_emulator.api == "graphql"
        else (r"RunPod's API failed \(HTTP 500\)")
    )
    with pytest.raises(ApiError, match=expected) as raised:
        provider.gpu_types()
    assert "runpod" in raised.value.hint.lower()
    assert len(sleeper.waits) == 2 and len(runpod_emulator.requests) == 3


def test_a_create_whose_answer_is_lost_makes_one_pod(runpod_emulator: EmulatorServer) -> None:
    runpod_emulator.inject_fault("drop_after_apply", operation="create")
    pod = provider_for(runpod_emulator).create(spec())
    assert [row["id"] for row in runpod_emulator.pods] == [pod.id]
    assert len(runpod_emulator.requests_for("create")) == 1


@pytest.mark.parametrize("fault", ["server_error", "something_went_wrong", "drop_before_apply"])
def test_a_create_that_failed_is_sent_again_after_checking(
    runpod_emulator: EmulatorServer, fault: str
) -> None:
    runpod_emulator.inject_fault(fault, operation="create")  # type: ignore[arg-type]
    pod = provider_for(runpod_emulator).create(spec())
    assert [row["id"] for row in runpod_emulator.pods] == [pod.id]
    assert len(runpod_emulator.requests_for("create")) == 2
    assert runpod_emulator.requests_for("list")  # it looked before sending again


def test_a_slow_create_is_waited_for_not_sent_again(runpod_emulator: EmulatorServer) -> None:
    """The API takes longer than a read may: a create waits for its answer (create_timeout_s)."""
    runpod_emulator.inject_fault("slow", operation="create", delay_s=1.0)
    provider = provider_for(runpod_emulator, api_timeout_s=0.3, create_timeout_s=30)
    pod = provider.create(spec(name="hctl-slow1"))
    assert [row["id"] for row in runpod_emulator.pods] == [pod.id]
    assert len(runpod_emulator.requests_for("create")) == 1
    assert runpod_emulator.requests_for("list") == []


def test_a_create_slower_than_the_client_is_found_by_name_not_duplicated(
    runpod_emulator: EmulatorServer,
) -> None:
    """RunPod places the pod after the client gave up waiting: hctl looks for it by its name
    for a grace period before anything else, and finds it there."""
    runpod_emulator.inject_fault("slow", operation="create", delay_s=1.5)
    provider = RunPodRestProvider if runpod_emulator.api == "rest" else RunPodGraphQLProvider
    settings = settings_for(
        runpod_emulator, api_timeout_s=0.3, create_timeout_s=0.3, create_grace_s=20
    )
    pod = provider(settings, sleep=time.sleep).create(spec(name="hctl-slow1"))
    assert pod.name == "hctl-slow1"
    assert [row["id"] for row in runpod_emulator.pods] == [pod.id]
    assert len(runpod_emulator.requests_for("create")) == 1
    assert len(runpod_emulator.requests_for("list")) >= 2  # looked, waited, found


def test_a_rate_limited_create_waits_and_retries(runpod_emulator: EmulatorServer) -> None:
    sleeper = Sleeper()
    runpod_emulator.inject_fault("rate_limited", operation="create", retry_after=3)
    provider_for(runpod_emulator, sleeper).create(spec())
    assert sleeper.waits == [3] and len(runpod_emulator.pods) == 1
    # A lookup by name happens only for failures that might have created a pod.
    assert runpod_emulator.requests_for("list") == []


def test_capacity_error_names_gpus_in_stock_with_prices(runpod_emulator: EmulatorServer) -> None:
    runpod_emulator.set_stock("NVIDIA GeForce RTX 4090", None)
    with pytest.raises(CapacityError) as raised:
        provider_for(runpod_emulator).create(spec(cloud_type="COMMUNITY"))
    message = raised.value.message
    assert message.startswith("No RTX 4090 is free on RunPod in community cloud right now.")
    assert "In stock: RTX A4000 16 GB $0.17/h" in message
    assert "RTX 3090 24 GB $0.22/h" in message and "H100 SXM" not in message
    assert 'hctl create-pod "NVIDIA RTX A4000"' in raised.value.hint
    assert runpod_emulator.pods == []


def test_capacity_in_one_cloud_points_at_the_other(runpod_emulator: EmulatorServer) -> None:
    runpod_emulator.set_stock("NVIDIA GeForce RTX 4090", None, cloud="COMMUNITY")
    with pytest.raises(CapacityError) as raised:
        provider_for(runpod_emulator).create(spec(cloud_type="COMMUNITY"))
    assert "`--cloud SECURE` ($0.44/h there)" in raised.value.hint


def test_an_unknown_gpu_at_create_is_named_as_such(runpod_emulator: EmulatorServer) -> None:
    # RunPod answers an invalid id with its capacity message; hctl says what really happened.
    with pytest.raises(UnknownGpuError, match="NVIDIA RTX 4090") as raised:
        provider_for(runpod_emulator).create(spec(gpu="NVIDIA RTX 4090"))
    assert '"NVIDIA GeForce RTX 4090"' in raised.value.hint


def test_one_resolver_takes_ids_names_and_unique_words(runpod_emulator: EmulatorServer) -> None:
    provider = provider_for(runpod_emulator)
    settings = provider.settings
    for name in (
        "RTX 4090",
        "rtx 4090",
        "4090",
        "NVIDIA GeForce RTX 4090",
        "nvidia geforce rtx 4090",
    ):
        assert pods.plan_pod(provider, settings, gpu=name).gpu.id == "NVIDIA GeForce RTX 4090"
    assert pods.plan_pod(provider, settings, gpu="a6000").gpu.id == "NVIDIA RTX A6000"
    with pytest.raises(UnknownGpuError, match="2 GPU types match 'H100'") as raised:
        pods.plan_pod(provider, settings, gpu="H100")
    assert (
        '"NVIDIA H100 80GB HBM3"' in raised.value.hint and '"NVIDIA H100 PCIe"' in raised.value.hint
    )
    with pytest.raises(UnknownGpuError, match="no GPU type 'A40'"):
        pods.plan_pod(provider, settings, gpu="A40")  # not the RTX A4000: whole words only
    with pytest.raises(UnknownGpuError) as raised:
        pods.plan_pod(provider, settings, gpu="RTX 4099")
    assert raised.value.hint.startswith('Did you mean "NVIDIA GeForce RTX 4090"')
    assert runpod_emulator.requests_for("create") == []


def test_gpu_catalogue_skips_the_placeholder_and_reads_stock_per_cloud(
    runpod_emulator: EmulatorServer,
) -> None:
    runpod_emulator.set_stock("NVIDIA GeForce RTX 3090", None, cloud="COMMUNITY")
    catalogue = {gpu.id: gpu for gpu in provider_for(runpod_emulator).gpu_types()}
    assert "unknown" not in catalogue
    assert catalogue["NVIDIA GeForce RTX 4090"].stock == "high"
    assert catalogue["NVIDIA H100 80GB HBM3"].stock is None
    assert catalogue["NVIDIA GeForce RTX 4090"].price("COMMUNITY") == 0.31
    # Either cloud: the cheapest offer in stock, so a quote is what the pod will cost.
    assert catalogue["NVIDIA GeForce RTX 3090"].price("ALL") == 0.43
    assert catalogue["NVIDIA GeForce RTX 4090"].price("ALL") == 0.31


@pytest.mark.parametrize(
    ("community_stock", "quoted"), [("High", 0.31), (None, 0.44)], ids=["community", "secure"]
)
def test_the_quote_is_what_the_pod_costs_in_the_cloud_it_lands_in(
    runpod_emulator: EmulatorServer, community_stock: str | None, quoted: float
) -> None:
    runpod_emulator.set_stock("NVIDIA GeForce RTX 4090", community_stock, cloud="COMMUNITY")
    provider = provider_for(runpod_emulator, cloud_type="ALL")
    plan = pods.plan_pod(provider, provider.settings)
    assert plan.price_per_hour == quoted
    pod = pods.create_pod(provider, plan)
    assert pod.cost_per_hr == quoted and pods.price_note(plan, pod) is None
    assert runpod_emulator.pod(pod.id)["cloudType"] == plan.offer.cloud


def test_create_sends_the_cuda_versions_the_image_needs(runpod_emulator: EmulatorServer) -> None:
    provider = provider_for(runpod_emulator)
    plan = pods.plan_pod(provider, provider.settings, image=IMAGE)  # cu1281: CUDA 12.8
    assert plan.spec.allowed_cuda_versions[0] == "12.8"
    assert all(float(version) >= 12.8 for version in plan.spec.allowed_cuda_versions)
    pod = pods.create_pod(provider, plan)
    row = runpod_emulator.pod(pod.id)
    assert row["allowedCudaVersions"] == plan.spec.allowed_cuda_versions
    assert row["cudaVersion"] == "12.9"  # a host new enough, never one with an older driver
    # No host of that GPU is new enough: REST knows before creating; GraphQL learns from RunPod.
    if runpod_emulator.api == "rest":
        with pytest.raises(ConfigError, match="No RTX A4000 host has CUDA 12.8 or newer"):
            pods.plan_pod(provider, provider.settings, gpu="NVIDIA RTX A4000", name="a4000")
    else:
        old = pods.plan_pod(provider, provider.settings, gpu="NVIDIA RTX A4000", name="a4000")
        with pytest.raises(CapacityError):
            pods.create_pod(provider, old)
    assert len(runpod_emulator.pods) == 1


def test_a_lease_is_sent_or_kept_by_the_pod(runpod_emulator: EmulatorServer) -> None:
    provider = provider_for(runpod_emulator)
    moment = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=timezone.utc)
    plan = pods.plan_pod(
        provider, provider.settings, max_hours=2, at_limit="terminate", now=lambda: moment
    )
    row = runpod_emulator.pod(pods.create_pod(provider, plan).id)
    if runpod_emulator.api == "graphql":  # RunPod keeps it: whole seconds with Z
        assert row["terminateAfter"] == "2026-11-30T14:00:00Z" and row["stopAfter"] is None
        assert "HCTL_LEASE_UNTIL" not in row["env"]
    else:  # REST has no deadline: the pod's own watchdog keeps it (see test_lease.py)
        assert row["env"]["HCTL_LEASE_UNTIL"] == f"{(moment + timedelta(hours=2)).timestamp():.0f}"
        assert "/v2/pods/{pod}/action" in row["env"]["HCTL_LEASE_COMMAND"]
        assert '"terminate"' in row["env"]["HCTL_LEASE_COMMAND"]


@pytest.mark.parametrize("action", ["stop", "terminate"])
def test_a_pod_stops_itself_with_its_own_key(runpod_emulator: EmulatorServer, action: str) -> None:
    """`self_stop_command` run as the pod would run it: RUNPOD_POD_ID and its pod-scoped key."""
    provider = provider_for(runpod_emulator)
    mine, other = provider.create(spec(name="hctl-mine")), provider.create(spec(name="hctl-other"))
    command = provider.self_stop_command(action)  # type: ignore[arg-type]

    def run_on(pod_id: str, key: str) -> subprocess.CompletedProcess:
        environment = {**os.environ, "RUNPOD_POD_ID": pod_id, "RUNPOD_API_KEY": key}
        return subprocess.run(["/bin/sh", "-c", command], env=environment, capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip

    refused = run_on(other.id, runpod_emulator.pod_key(mine.id))  # a pod's key: that pod only
    assert refused.returncode != 0 and runpod_emulator.pod(other.id)["status"] == "RUNNING"
    done = run_on(mine.id, runpod_emulator.pod_key(mine.id))
    assert done.returncode == 0, done.stderr
    expected = {"stop": "EXITED", "terminate": None}[action]
    assert (runpod_emulator.pod(mine.id) or {}).get("status") == expected
    assert runpod_emulator.requests[-1].auth == "pod"
    assert subprocess.run(["/bin/sh", "-c", command], env={"PATH": os.environ["PATH"]},
                          capture_output=True, timeout=60, check=False).returncode != 0  # fmt: skip


def test_ssh_endpoints_follow_the_emulator_routing(runpod_emulator: EmulatorServer) -> None:
    runpod_emulator.ready_after_polls = 0
    runpod_emulator.route_ssh(direct=("127.0.0.1", 2222), pod_host_id="root")
    provider = provider_for(runpod_emulator, ssh_proxy_host="127.0.0.1", ssh_proxy_port=2200)
    pod = provider.get(provider.create(spec()).id)
    assert pod.ready and pod.status == PodStatus.RUNNING
    assert pod.endpoint("direct").address == "ssh://root@127.0.0.1:2222"
    assert pod.endpoint("proxy").address == "ssh://root@127.0.0.1:2200"


def test_a_pods_public_tcp_ports_and_private_address_are_read_back(
    runpod_emulator: EmulatorServer,
) -> None:
    """What a job on several pods needs: the database port's public mapping, and the private
    network's address where the API has one (REST `globalNetworking`)."""
    runpod_emulator.ready_after_polls = 0
    runpod_emulator.route_ssh(direct=("203.0.113.7", 2222))
    provider = provider_for(runpod_emulator)
    created = provider.create(spec(ports=["22/tcp", "5432/tcp"], global_networking=True))
    pod = provider.get(created.id)
    mapping = pod.public_port(5432)
    assert mapping is not None and (mapping.host, mapping.port) == ("203.0.113.7", 45432)
    assert provider.capabilities.public_tcp_ports
    assert provider.capabilities.private_network == (runpod_emulator.api == "rest")
    assert pod.private_ip == ("10.65.1.42" if runpod_emulator.api == "rest" else None)
    runpod_emulator.cloud.global_networking_offered = False  # a data centre without it
    other = provider.get(provider.create(spec("hctl-test-2", global_networking=True)).id)
    assert other.private_ip is None and other.public_port(5432) is None


def test_wait_until_ready_rereads_endpoints_after_every_start(
    runpod_emulator: EmulatorServer,
) -> None:
    runpod_emulator.ready_after_polls = 2
    provider = provider_for(runpod_emulator)
    created = provider.create(spec())
    assert created.status == PodStatus.STARTING
    polls: list[str] = []
    ready = pods.wait_until_ready(
        provider, created.id, timeout_s=60, sleep=lambda _s: None,
        on_poll=lambda pod, _elapsed: polls.append(pod.status + (" ready" if pod.ready else "")),
    )  # fmt: skip
    assert polls == ["starting", "starting", "running ready"]
    assert ready.gpus and ready.gpus[0].utilisation_percent == 37  # seen without SSH
    first_port = ready.endpoint("direct").port
    assert provider.stop(created.id).status == PodStatus.STOPPED
    assert provider.stop(created.id).status == PodStatus.STOPPED  # stopping twice is fine
    assert provider.get(created.id).ssh == [ready.endpoint("proxy")]  # no direct while stopped
    provider.start(created.id)
    again = pods.wait_until_ready(provider, created.id, timeout_s=60, sleep=lambda _s: None)
    assert again.endpoint("direct").port != first_port


def test_wait_until_ready_gives_up_in_time_and_leaves_the_pod(
    runpod_emulator: EmulatorServer,
) -> None:
    runpod_emulator.ready_after_polls = 1000
    provider = provider_for(runpod_emulator)
    created = provider.create(spec())
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(PodNotReadyError, match="not reachable after 30 s") as raised:
        pods.wait_until_ready(
            provider, created.id, timeout_s=30, sleep=sleep, clock=lambda: now[0], interval_s=10
        )
    assert f"hctl terminate-pod {created.id}" in raised.value.hint
    assert len(runpod_emulator.requests_for("get")) == 4  # at 0, 10, 20 and 30 s
    assert [row["id"] for row in runpod_emulator.pods] == [created.id]  # the caller decides


def test_spot_pods_bid_and_resume_at_the_price_runpod_asks(runpod_emulator: EmulatorServer) -> None:
    provider = provider_for(runpod_emulator)
    spot = spec(cloud_type="COMMUNITY", spot=True, bid_per_gpu=0.21)
    if runpod_emulator.api == "rest":
        assert not provider.capabilities.spot
        assert "runpod-graphql" in provider.capabilities.no_spot_hint
        assert "early 2027" in provider.capabilities.no_spot_hint
        with pytest.raises(ConfigError, match="no spot pods") as raised:
            pods.plan_pod(provider, provider.settings, spot=True, bid_per_gpu=0.21)
        assert "HCTL_PROVIDER=runpod-graphql" in raised.value.hint
        return
    assert "early 2027" in provider.capabilities.spot_note
    pod = provider.create(spot)
    assert pod.spot and pod.cost_per_hr == 0.21
    provider.stop(pod.id)
    assert provider.start(pod.id).active
    (resume,) = runpod_emulator.requests_for("podBidResume")
    assert resume.variables["bidPerGpu"] == 0.20  # lowestBidPriceToResume, not the old bid


def test_terminate_is_idempotent_and_unknown_pods_are_named(
    runpod_emulator: EmulatorServer,
) -> None:
    provider = provider_for(runpod_emulator)
    pod = provider.create(spec())
    runpod_emulator.inject_fault("drop_after_apply", operation="terminate")
    provider.terminate(pod.id)
    assert runpod_emulator.pods == []
    with pytest.raises(PodNotFoundError, match="no-such-pod"):
        provider.terminate("no-such-pod")


def test_what_runpod_billed_for_each_pod(runpod_emulator: EmulatorServer) -> None:
    provider = provider_for(runpod_emulator)
    kept, gone = provider.create(spec(name="hctl-kept")), provider.create(spec(name="hctl-gone"))
    runpod_emulator.elapse(3600)
    provider.terminate(gone.id)
    runpod_emulator.elapse(3600)  # a terminated pod bills no more, but its bill stays
    since = datetime.now(timezone.utc) - timedelta(days=1)
    billed = provider.billed([kept.id, gone.id], since)
    if runpod_emulator.api == "graphql":
        assert billed is None and not provider.capabilities.billing
        return
    assert billed is not None
    assert billed[kept.id] == pytest.approx(2 * kept.cost_per_hr, rel=0.01)
    assert billed[gone.id] == pytest.approx(gone.cost_per_hr, rel=0.01)
    assert provider.billed([kept.id], since) == {kept.id: pytest.approx(billed[kept.id], rel=0.01)}


def test_resolve_pod_by_id_name_or_the_only_running_hctl_pod(
    runpod_emulator: EmulatorServer,
) -> None:
    provider = provider_for(runpod_emulator)
    runpod_emulator.add_pod(name="my-notebook")  # not hctl's: never picked by default
    with pytest.raises(PodNotFoundError, match="no running hctl pod") as raised:
        pods.resolve_pod(provider, None)
    assert "my-notebook" in raised.value.hint
    first = runpod_emulator.add_pod(name="hctl-first")
    stopped = runpod_emulator.add_pod(name="hctl-stopped", status="EXITED")
    assert pods.resolve_pod(provider, None).id == first["id"]
    assert pods.resolve_pod(provider, None, status="stopped").id == stopped["id"]
    assert pods.resolve_pod(provider, "hctl-stopped").id == stopped["id"]
    assert pods.resolve_pod(provider, first["id"]).name == "hctl-first"
    runpod_emulator.add_pod(name="hctl-second")
    with pytest.raises(ConfigError, match="2 running hctl pods: hctl-first") as raised:
        pods.resolve_pod(provider, None)
    with pytest.raises(PodNotFoundError, match="nothing-like-it"):
        pods.resolve_pod(provider, "nothing-like-it")


def test_a_wait_for_rate_limits_is_announced_and_a_very_long_one_refused(
    runpod_emulator: EmulatorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    sleeper = Sleeper()
    provider = provider_for(runpod_emulator, sleeper, api_backoff_s=0.5)
    runpod_emulator.inject_fault("rate_limited", operation="list", retry_after=7)
    runpod_emulator.inject_fault("server_error", operation="list", status=503)
    assert provider.list() == []
    assert sleeper.waits == [7, 1.0]  # Retry-After, then the second backoff (0.5 s doubled)
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 1  # a wait under 2 s goes unsaid
    assert notes[0].startswith("note: ") and "HTTP 429" in notes[0]
    assert "Retrying in 7 s (retry 1 of 4)." in notes[0]
    runpod_emulator.inject_fault("rate_limited", operation="create", retry_after=900)
    with pytest.raises(ApiError) as caught:
        provider.create(spec())
    assert "asks to wait 900 s" in caught.value.message and "15 minute" in caught.value.hint
    assert sleeper.waits == [7, 1.0]  # no silent quarter of an hour
    assert runpod_emulator.pods == [] and len(runpod_emulator.requests_for("create")) == 1


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"container_disk_gb": 99999999}, "more than anyone means"),
        ({"container_disk_gb": 5}, "too small"),
        ({"volume_gb": 5}, "out of range"),
        ({"volume_gb": 10**9}, "out of range"),
        ({"max_hours": float("nan")}, "not a number"),
        ({"max_hours": 10**6}, "at most 720"),
        ({"spot": True, "bid_per_gpu": float("inf")}, "not a number"),
    ],
)
def test_values_no_one_means_are_refused_before_any_request(
    runpod_emulator: EmulatorServer, options: dict, fragment: str
) -> None:
    provider = provider_for(runpod_emulator)
    with pytest.raises(ConfigError, match=fragment):
        pods.plan_pod(provider, provider.settings, **options)
    assert runpod_emulator.requests == []


def test_the_lease_deadline_is_whole_seconds_with_z() -> None:
    from hctl.providers.runpod.graphql_provider import deadline_text

    moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2)))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", deadline_text(moment))
    assert deadline_text(moment) == "2026-01-02T01:04:05Z"
    assert PodLease(until=moment).action == "stop"  # a lease stops unless told to terminate
