"""The RunPod provider against the emulator: retries, the lost-create guard, errors, readiness."""

from __future__ import annotations

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
from hctl.providers.base import PodSpec
from hctl.providers.runpod import RunPodProvider
from hctl.settings import load_settings
from tests.standins.runpod_emulator import RunPodEmulator

IMAGE = "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404"


class Sleeper:
    """Records the waits instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def provider_for(
    emulator: RunPodEmulator, sleeper: Sleeper | None = None, **overrides: object
) -> RunPodProvider:
    settings = load_settings(
        runpod_api_url=emulator.url, runpod_api_key=emulator.api_key, **overrides
    )
    return RunPodProvider(settings, sleep=sleeper or Sleeper())


def spec(name: str = "hctl-test-1", gpu: str = "NVIDIA GeForce RTX 4090") -> PodSpec:
    return PodSpec(name=name, gpu_type_id=gpu, image=IMAGE, env={"A": "1"})


def test_the_registry_builds_the_runpod_provider(runpod_emulator: RunPodEmulator) -> None:
    settings = load_settings(runpod_api_url=runpod_emulator.url)
    assert set(PROVIDERS) == {"runpod"}
    assert isinstance(make_provider(settings), RunPodProvider)


def test_values_travel_as_variables_with_bearer_auth(runpod_emulator: RunPodEmulator) -> None:
    provider = provider_for(runpod_emulator)
    quoted = 'a "quoted" value \\ with a backslash'
    pod = provider.create(spec().model_copy(update={"env": {"NOTE": quoted}}))
    assert runpod_emulator.pod(pod.id)["env"] == {"NOTE": quoted}
    (request,) = runpod_emulator.requests_for("podFindAndDeployOnDemand")
    assert request.auth == "bearer"
    assert quoted not in request.query and request.variables["input"]["env"][0]["value"] == quoted


def test_missing_key_fails_before_any_request(runpod_emulator: RunPodEmulator) -> None:
    provider = RunPodProvider(load_settings(runpod_api_url=runpod_emulator.url))
    with pytest.raises(AuthError, match="No RunPod API key"):
        provider.list()
    assert runpod_emulator.requests == []


def test_wrong_key_is_not_retried(runpod_emulator: RunPodEmulator) -> None:
    sleeper = Sleeper()
    settings = load_settings(runpod_api_url=runpod_emulator.url, runpod_api_key="rpa_wrong")
    with pytest.raises(AuthError, match="rejected") as raised:
        RunPodProvider(settings, sleep=sleeper).list()
    assert "hctl config set runpod_api_key" in raised.value.hint
    assert len(runpod_emulator.requests) == 1 and sleeper.waits == []


def test_reads_retry_429_honouring_retry_after_and_5xx_with_backoff(
    runpod_emulator: RunPodEmulator,
) -> None:
    sleeper = Sleeper()
    provider = provider_for(runpod_emulator, sleeper, api_backoff_s=2)
    runpod_emulator.inject_fault("rate_limited", retry_after=7)
    runpod_emulator.inject_fault("server_error", status=503, times=2)
    assert provider.list() == []
    assert sleeper.waits == [7, 4, 8]  # Retry-After, then backoff 2 s doubling per attempt


def test_a_request_that_times_out_is_retried(runpod_emulator: RunPodEmulator) -> None:
    sleeper = Sleeper()
    provider = provider_for(runpod_emulator, sleeper, api_timeout_s=0.2, api_retries=1)
    runpod_emulator.inject_fault("slow", delay_s=1.0)
    assert provider.list() == []
    assert len(sleeper.waits) == 1 and len(runpod_emulator.requests) == 2
    runpod_emulator.inject_fault("slow", delay_s=1.0, times=2)
    with pytest.raises(ApiError, match="did not answer in time"):
        provider.list()


def test_retries_are_bounded_and_end_in_a_clear_message(runpod_emulator: RunPodEmulator) -> None:
    sleeper = Sleeper()
    provider = provider_for(runpod_emulator, sleeper, api_retries=2)
    runpod_emulator.inject_fault("something_went_wrong", times=10)
    with pytest.raises(ApiError, match="generic error: Something went wrong") as raised:
        provider.gpu_types()
    assert "console" in raised.value.hint
    assert len(sleeper.waits) == 2 and len(runpod_emulator.requests) == 3


def test_a_create_whose_answer_is_lost_makes_one_pod(runpod_emulator: RunPodEmulator) -> None:
    runpod_emulator.inject_fault("drop_after_apply", operation="podFindAndDeployOnDemand")
    pod = provider_for(runpod_emulator).create(spec())
    assert [row["id"] for row in runpod_emulator.pods] == [pod.id]
    assert len(runpod_emulator.requests_for("podFindAndDeployOnDemand")) == 1


@pytest.mark.parametrize("fault", ["server_error", "something_went_wrong", "drop_before_apply"])
def test_a_create_that_failed_is_sent_again_after_checking(
    runpod_emulator: RunPodEmulator, fault: str
) -> None:
    runpod_emulator.inject_fault(fault, operation="podFindAndDeployOnDemand")  # type: ignore[arg-type]
    pod = provider_for(runpod_emulator).create(spec())
    assert [row["id"] for row in runpod_emulator.pods] == [pod.id]
    assert len(runpod_emulator.requests_for("podFindAndDeployOnDemand")) == 2


def test_a_rate_limited_create_waits_and_retries(runpod_emulator: RunPodEmulator) -> None:
    sleeper = Sleeper()
    runpod_emulator.inject_fault(
        "rate_limited", operation="podFindAndDeployOnDemand", retry_after=3
    )
    provider_for(runpod_emulator, sleeper).create(spec())
    assert sleeper.waits == [3] and len(runpod_emulator.pods) == 1
    # A lookup by name happens only for failures that might have created a pod.
    assert runpod_emulator.requests_for("myself") == []


def test_capacity_error_names_gpus_in_stock_with_prices(runpod_emulator: RunPodEmulator) -> None:
    runpod_emulator.set_stock("NVIDIA GeForce RTX 4090", None)
    with pytest.raises(CapacityError) as raised:
        provider_for(runpod_emulator).create(spec())
    message = raised.value.message
    assert message.startswith("No RTX 4090 is free on RunPod right now. In stock: RTX A4000")
    assert "RTX 3090 24 GB $0.22/h" in message and "H100 SXM" not in message
    assert 'hctl create-pod "NVIDIA RTX A4000"' in raised.value.hint
    assert runpod_emulator.pods == []


def test_an_unknown_gpu_at_create_is_named_as_such(runpod_emulator: RunPodEmulator) -> None:
    # RunPod answers an invalid id with its capacity message; hctl says what really happened.
    with pytest.raises(UnknownGpuError, match="NVIDIA RTX 4090") as raised:
        provider_for(runpod_emulator).create(spec(gpu="NVIDIA RTX 4090"))
    assert '"NVIDIA GeForce RTX 4090"' in raised.value.hint


def test_unknown_gpu_is_caught_before_anything_is_sent(runpod_emulator: RunPodEmulator) -> None:
    provider = provider_for(runpod_emulator)
    settings = provider.settings
    with pytest.raises(UnknownGpuError) as raised:
        pods.plan_pod(provider, settings, gpu="rtx 4090")
    assert raised.value.hint.startswith('Did you mean "NVIDIA GeForce RTX 4090"?')
    with pytest.raises(UnknownGpuError) as raised:
        pods.plan_pod(provider, settings, gpu="a6000")
    assert '"NVIDIA RTX A6000"' in raised.value.hint
    # Ids match whatever their case.
    assert pods.plan_pod(provider, settings, gpu="nvidia l40s").gpu.id == "NVIDIA L40S"
    assert runpod_emulator.requests_for("podFindAndDeployOnDemand") == []


def test_gpu_catalogue_skips_the_placeholder_and_reads_stock(
    runpod_emulator: RunPodEmulator,
) -> None:
    catalogue = {gpu.id: gpu for gpu in provider_for(runpod_emulator).gpu_types()}
    assert "unknown" not in catalogue
    assert catalogue["NVIDIA GeForce RTX 4090"].stock_status == "High"
    assert catalogue["NVIDIA H100 80GB HBM3"].stock_status is None
    assert catalogue["NVIDIA GeForce RTX 4090"].price("COMMUNITY") == 0.31


def test_ssh_endpoints_follow_the_emulator_routing(
    runpod_emulator: RunPodEmulator,
) -> None:
    runpod_emulator.ready_after_polls = 0
    runpod_emulator.route_ssh(direct=("127.0.0.1", 2222), pod_host_id="root")
    provider = provider_for(runpod_emulator, ssh_proxy_host="127.0.0.1", ssh_proxy_port=2200)
    pod = provider.get(provider.create(spec()).id)
    assert pod.ready
    assert pod.endpoint("direct").address == "ssh://root@127.0.0.1:2222"
    assert pod.endpoint("proxy").address == "ssh://root@127.0.0.1:2200"


def test_wait_until_ready_rereads_endpoints_after_every_resume(
    runpod_emulator: RunPodEmulator,
) -> None:
    runpod_emulator.ready_after_polls = 2
    provider = provider_for(runpod_emulator)
    created = provider.create(spec())
    polls: list[str] = []
    ready = pods.wait_until_ready(
        provider, created.id, timeout_s=60, sleep=lambda _s: None,
        on_poll=lambda pod, _elapsed: polls.append(pod.status + (" ready" if pod.ready else "")),
    )  # fmt: skip
    assert polls == ["RUNNING", "RUNNING", "RUNNING ready"]
    first_port = ready.endpoint("direct").port
    assert provider.stop(created.id).status == "EXITED"
    assert provider.get(created.id).ssh == [ready.endpoint("proxy")]  # no direct while stopped
    provider.start(created.id)
    again = pods.wait_until_ready(provider, created.id, timeout_s=60, sleep=lambda _s: None)
    assert again.endpoint("direct").port != first_port


def test_wait_until_ready_gives_up_in_time_and_leaves_the_pod(
    runpod_emulator: RunPodEmulator,
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
    assert len(runpod_emulator.requests_for("pod")) == 4  # at 0, 10, 20 and 30 s
    assert [row["id"] for row in runpod_emulator.pods] == [created.id]  # the caller decides


def test_spot_pods_are_bid_for_and_resumed_with_a_bid(runpod_emulator: RunPodEmulator) -> None:
    provider = provider_for(runpod_emulator)
    pod = provider.create(spec().model_copy(update={"spot": True, "bid_per_gpu": 0.21}))
    assert pod.spot and pod.cost_per_hr == 0.21
    provider.stop(pod.id)
    assert provider.start(pod.id).status == "RUNNING"
    assert len(runpod_emulator.requests_for("podBidResume")) == 1


def test_terminate_is_idempotent_and_unknown_pods_are_named(
    runpod_emulator: RunPodEmulator,
) -> None:
    provider = provider_for(runpod_emulator)
    pod = provider.create(spec())
    runpod_emulator.inject_fault("drop_after_apply", operation="podTerminate")
    provider.terminate(pod.id)
    assert runpod_emulator.pods == []
    with pytest.raises(PodNotFoundError, match="no-such-pod"):
        provider.terminate("no-such-pod")


def test_resolve_pod_by_id_name_or_the_only_running_hctl_pod(
    runpod_emulator: RunPodEmulator,
) -> None:
    provider = provider_for(runpod_emulator)
    runpod_emulator.add_pod(name="my-notebook")  # not hctl's: never picked by default
    with pytest.raises(PodNotFoundError, match="no running hctl pod") as raised:
        pods.resolve_pod(provider, None)
    assert "my-notebook" in raised.value.hint
    first = runpod_emulator.add_pod(name="hctl-first")
    stopped = runpod_emulator.add_pod(name="hctl-stopped", status="EXITED")
    assert pods.resolve_pod(provider, None).id == first["id"]
    assert pods.resolve_pod(provider, None, status="STOPPED").id == stopped["id"]
    assert pods.resolve_pod(provider, "hctl-stopped").id == stopped["id"]
    assert pods.resolve_pod(provider, first["id"]).name == "hctl-first"
    runpod_emulator.add_pod(name="hctl-second")
    with pytest.raises(ConfigError, match="2 running hctl pods: hctl-first") as raised:
        pods.resolve_pod(provider, None)
    with pytest.raises(PodNotFoundError, match="nothing-like-it"):
        pods.resolve_pod(provider, "nothing-like-it")


def test_a_wait_for_rate_limits_is_announced_and_a_very_long_one_refused(
    runpod_emulator: RunPodEmulator,
) -> None:
    from hctl.providers.runpod.client import GraphQLClient

    sleeper, notes = Sleeper(), []
    client = GraphQLClient(
        runpod_emulator.url, runpod_emulator.api_key, sleep=sleeper, on_wait=notes.append
    )
    runpod_emulator.inject_fault("rate_limited", retry_after=7)
    assert client.execute("query { myself { id } }", retry="always")["myself"]
    assert sleeper.waits == [7] and len(notes) == 1
    assert "HTTP 429" in notes[0] and "Retrying in 7 s" in notes[0]
    runpod_emulator.inject_fault("rate_limited", retry_after=900)
    with pytest.raises(ApiError) as caught:
        client.execute("query { myself { id } }", retry="always")
    assert "asks to wait 900 s" in caught.value.message and "15 minute" in caught.value.hint
    assert sleeper.waits == [7]  # no silent quarter of an hour
