"""A job on several pods, planned before anything is rented: `--pods` is checked, the way the
pods reach the database on the first is decided from what the provider offers, the estimate
counts every pod's GPUs, and each pod's workers get their own names and the database's URL (its
password only in a file). Also: an existing pod's GPUs, and an SSH host's, get a worker each."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hctl.errors import ConfigError, JobError
from hctl.gpus import resolve_gpu
from hctl.providers.base import Capabilities, Pod, PodStatus, PortMapping
from hctl.services.database import new_database, password_line
from hctl.services.estimate import estimate_job
from hctl.services.fleet import database_address, plan_fleet
from hctl.services.job_protocol import launch_command, with_secrets
from hctl.services.jobs import JobRecord
from hctl.services.launch import gpu_each_on_host
from hctl.services.models import ModelInfo
from hctl.services.request import RunRequest, check_request
from hctl.services.team import plan_team
from tests.e2e.fakes import CATALOGUE

SMALL = ModelInfo(reference="m/4B", parameters=4_000_000_000)
BIG = ModelInfo(reference="big/20B", parameters=20_000_000_000)
RTX_4090 = resolve_gpu(CATALOGUE, "RTX 4090")


@pytest.mark.parametrize(
    ("options", "message", "hint"),
    [
        ({"pods": 0}, "--pods 0 is not a count", "from 1 to 16"),
        ({"pods": 17}, "--pods 17 is not a count", "from 1 to 16"),
        ({"pods": 2, "on": "local"}, "--pods only applies to a pod", "leave out --on"),
        ({"pods": 2, "pod": "abc"}, "--pods only applies to a new pod", "leave out --pod"),
    ],
)
def test_pod_counts_are_checked_before_anything_starts(
    options: dict, message: str, hint: str
) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        check_request(RunRequest(model="m", **options))
    assert hint in (raised.value.hint or "")


def test_every_pod_gets_its_workers_and_the_estimate_pays_for_every_gpu() -> None:
    team = plan_team(RunRequest(model="m", gpus=2, pods=3), SMALL, RTX_4090)
    assert (team.pods, team.gpu_count, team.workers, team.one_gpu_each) == (3, 2, 2, True)
    assert (team.total_gpus, team.total_workers) == (6, 6)
    assert team.note == "3 pods, 2 workers on each (one per GPU): 6 workers share one search"
    one = estimate_job(SMALL, RTX_4090, n_trials=200)
    fleet = estimate_job(SMALL, RTX_4090, n_trials=200, gpu_count=2, workers=2, pods=3)
    assert fleet.price_per_hour == pytest.approx(6 * one.price_per_hour)
    assert fleet.seconds_of("search") == pytest.approx(one.seconds_of("search") / 6)
    assert fleet.gpu_name == "3 pods of 2x RTX 4090" and fleet.fits
    assert fleet.total_cost == pytest.approx(fleet.price_per_hour * fleet.total_seconds / 3600)


def test_a_model_too_big_for_one_gpu_runs_one_worker_per_pod_and_too_big_for_k_is_refused() -> None:
    team = plan_team(RunRequest(model="m", gpus=2, pods=2), BIG, RTX_4090)
    assert (team.workers, team.one_gpu_each, team.total_workers) == (1, False, 2)
    assert "one worker on each across its 2 GPUs" in team.note
    huge = ModelInfo(reference="huge/70B", parameters=70_000_000_000)
    estimate = estimate_job(huge, RTX_4090, n_trials=10, gpu_count=2, workers=1, pods=2)
    assert not estimate.fits and "2x RTX 4090 has 48 GB" in estimate.fit_problem


@dataclass
class FakeProvider:
    name: str
    capabilities: Capabilities


def test_the_network_between_pods_is_decided_from_what_the_provider_offers() -> None:
    request = RunRequest(model="m", pods=2)
    rest = FakeProvider("rest", Capabilities(private_network=True, public_tcp_ports=True))
    graphql = FakeProvider("graphql", Capabilities(public_tcp_ports=True))
    neither = FakeProvider("island", Capabilities())
    private = plan_fleet(request, rest, 5432)
    assert private is not None and private.network == "private"
    assert "private network (globalNetworking)" in private.note
    assert private.ports == ["22/tcp", "5432/tcp"]  # the public port is the fallback
    public = plan_fleet(request, graphql, 6000)
    assert public is not None and public.network == "public" and "TCP port 6000" in public.note
    assert plan_fleet(RunRequest(model="m", pods=1), neither, 5432) is None
    with pytest.raises(ConfigError, match="cannot reach each other") as raised:
        plan_fleet(request, neither, 5432)
    assert "--gpus K" in (raised.value.hint or "")


def _pod(pod_id: str, private_ip: str | None = None, ports: list | None = None) -> Pod:
    return Pod(
        id=pod_id, name=pod_id, status=PodStatus.RUNNING, private_ip=private_ip,
        public_ports=ports or [],
    )  # fmt: skip


def test_each_pod_reaches_the_database_the_best_way_it_can() -> None:
    first = _pod("one", "10.0.0.1", [PortMapping(private=5432, host="203.0.113.9", port=40123)])
    assert database_address(first, first, 5432)[:2] == ("127.0.0.1", 5432)
    assert database_address(first, _pod("two", "10.0.0.2"), 5432)[:2] == ("10.0.0.1", 5432)
    # A pod placed where the private network is not offered: pod 1's public port.
    assert database_address(first, _pod("three"), 5432)[:2] == ("203.0.113.9", 40123)
    with pytest.raises(JobError, match="cannot reach the database"):
        database_address(_pod("one"), _pod("two"), 5432)


def test_the_workers_of_each_pod_have_their_own_names_and_no_password_in_argv() -> None:
    database = new_database("1129-2200-ab12", host="10.0.0.1")
    command = launch_command(
        "hctl-worker", "/w/jobs/x-pod2", workers=2, one_gpu_each=True, first_worker=3,
        storage=database.url,
    )  # fmt: skip
    assert "--worker 3" in command and "--worker 4" in command and "--worker 1 " not in command
    assert "CUDA_VISIBLE_DEVICES=0" in command and "CUDA_VISIBLE_DEVICES=1" in command
    assert f"--storage {database.url}" in command and database.password not in command
    assert database.password in password_line(database)
    one = launch_command("hctl-worker", "/w/jobs/x-pod1", storage=database.url)
    assert "--worker 1" in one  # named, so it never takes another pod's name
    assert "PGPASSFILE=/w/jobs/x/.pgpass" in with_secrets("/w/jobs/x", "true")


def test_an_existing_pod_with_several_gpus_runs_a_worker_on_each() -> None:
    team = plan_team(RunRequest(model="m", pod="abc"), SMALL, RTX_4090, pod_gpus=2)
    assert (team.gpu_count, team.workers, team.one_gpu_each) == (2, 2, True)
    assert plan_team(RunRequest(model="m", pod="abc"), SMALL, RTX_4090).workers == 1


@dataclass
class Output:
    output: str
    exit_code: int = 0


class GpuHost:
    description = "ssh://root@gpu-host:22"

    def __init__(self, listing: str) -> None:
        self.listing = listing

    def run(self, command: str, timeout: float = 0) -> Output:
        assert "nvidia-smi" in command
        return Output(self.listing)


@pytest.mark.parametrize(("listing", "pinned"), [("0\n1\n", True), ("0\n1\n2\n", True),
                                                 ("0\n", False), ("", False)])  # fmt: skip
def test_workers_on_an_ssh_host_get_a_gpu_each_when_it_has_enough(
    listing: str, pinned: bool
) -> None:
    record = JobRecord(job_id="j", model="m", worker_model="m", n_trials=4, target="ssh",
                       remote_job_dir="/j", workers=2)  # fmt: skip
    notes: list[str] = []
    assert gpu_each_on_host(record, GpuHost(listing), notes.append) is pinned  # type: ignore[arg-type]
    local = record.model_copy(update={"target": "local"})
    assert gpu_each_on_host(local, GpuHost(listing), notes.append) is False  # type: ignore[arg-type]
