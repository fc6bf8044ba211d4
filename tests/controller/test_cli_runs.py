"""`hctl run` / `hctl estimate` against the RunPod emulator: estimates, and bad input refused
before anything is created."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hctl.cli import app
from tests.conftest import REPO_ROOT

TINY = str(REPO_ROOT / "tests" / "fixtures" / "tiny-refuser")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):  # noqa: ANN201
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_estimate_compares_gpus_with_hourly_and_total_prices(hctl_rest_env, runner) -> None:
    result = invoke(runner, "estimate", "Qwen/Qwen3-4B-Instruct-2507", "--params", "4B",
                    "--trials", "200", "--gpu", "NVIDIA GeForce RTX 4090",
                    "--gpu", "NVIDIA A100 80GB PCIe")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "$/hour" in result.output and "total" in result.output
    assert "RTX 4090" in result.output and "A100" in result.output
    assert "4B parameters (from --params)" in result.output
    assert hctl_rest_env.pods == []


def test_a_model_of_unknown_size_asks_for_params(hctl_rest_env, runner) -> None:
    result = runner.invoke(app, ["estimate", "microsoft/phi-4"])  # no size in the name
    assert result.exit_code == 2
    assert "--params" in result.output and "Traceback" not in result.output


def test_without_the_hub_the_size_in_a_models_name_is_used_and_said(hctl_rest_env, runner) -> None:
    result = invoke(runner, "estimate", "Qwen/Qwen3-4B-Instruct-2507", "--gpu",
                    "NVIDIA GeForce RTX 4090")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "4B parameters (from its name;" in result.output and "--params" in result.output
    named = invoke(runner, "estimate", "Qwen/Qwen3-4B-Instruct-2507", "--params", "4B",
                   "--gpu", "NVIDIA GeForce RTX 4090")  # fmt: skip
    assert result.output.splitlines()[1:] == named.output.splitlines()[1:]  # the same estimate


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["/nonexistent/model-folder"], "No model at"),
        ([TINY, "--trials", "0"], "at least 1"),
        ([TINY, "--trials", "3", "--trial", "0"], "--trial 0"),
        ([TINY, "--trials", "3", "--trial", "4"], "1-3"),
        ([TINY, "--gpu", "RTX 9999"], "RTX 9999"),
        ([TINY, "--pod", "no-such-pod"], "no-such-pod"),
        ([TINY, "--on", "mars"], "not a target"),
        ([TINY, "--set", "no_such_setting=1"], "no_such_setting"),
        ([TINY, "--max-cost", "0.0000001"], "above --max-cost"),
        ([TINY, "--keep", "--terminate"], "contradict"),
    ],
)
def test_bad_input_is_one_clear_error_and_creates_nothing(
    hctl_rest_env, runner, arguments: list[str], message: str
) -> None:
    result = runner.invoke(app, ["run", *arguments, "--yes"])
    assert result.exit_code != 0
    assert "error:" in result.output and message in result.output
    assert "Traceback" not in result.output
    assert hctl_rest_env.pods == []
    assert hctl_rest_env.requests_for("create") == []


def test_a_model_too_big_for_the_gpu_fails_preflight_with_alternatives(
    hctl_rest_env, runner
) -> None:
    result = runner.invoke(app, ["run", "big/model", "--params", "30B", "--gpu",
                                 "NVIDIA GeForce RTX 4090", "--yes"])  # fmt: skip
    assert result.exit_code == 2
    assert "Pre-flight check failed" in result.output and "--gpu" in result.output
    assert hctl_rest_env.pods == []


def test_without_yes_and_without_a_terminal_nothing_is_rented(hctl_rest_env, runner) -> None:
    result = runner.invoke(app, ["run", TINY, "--trials", "2"])
    assert result.exit_code == 130
    assert "--yes" in result.output
    assert hctl_rest_env.pods == []


def test_jobs_and_results_of_an_unknown_job(runner, tmp_path: Path) -> None:
    assert "job" in invoke(runner, "jobs").output
    result = runner.invoke(app, ["results", "nope"])
    assert result.exit_code == 1 and "No job 'nope'" in result.output


def test_jobs_and_results_show_what_runpod_billed_next_to_the_estimate(
    hctl_runpod_env, runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REST v2 reports each pod's bill (/v2/billing/pods); GraphQL does not: then the estimate."""
    from hctl.providers import make_provider
    from hctl.providers.base import PodSpec
    from hctl.services.jobs import JobRecord, JobStore
    from hctl.settings import load_settings

    monkeypatch.setenv("COLUMNS", "250")
    provider = make_provider(load_settings())
    first = provider.create(PodSpec(name="hctl-j-1", gpu_type_id="NVIDIA GeForce RTX 4090",
                                    image="i", cloud_type="COMMUNITY"))  # fmt: skip
    hctl_runpod_env.elapse(3600)  # an hour at $0.31
    provider.terminate(first.id)  # the job moved to a second pod (a resume): both count
    second = provider.create(PodSpec(name="hctl-j-2", gpu_type_id="NVIDIA GeForce RTX 4090",
                                     image="i", cloud_type="COMMUNITY"))  # fmt: skip
    hctl_runpod_env.elapse(1800)
    JobStore().save(JobRecord(job_id="j", model="m", worker_model="m", n_trials=2, target="pod",
                              pod_id=second.id, pod_ids=[first.id, second.id], remote_job_dir="",
                              status="finished", estimated_cost=0.5))  # fmt: skip
    shown = invoke(runner, "results", "j")
    listed = invoke(runner, "jobs")
    if hctl_runpod_env.api == "rest":
        assert "Cost of its pods: $0.47 billed (estimate $0.50)." in shown.output
        assert "$0.47 billed (estimate $0.50)" in listed.output
    else:
        assert "Cost of its pods: estimate $0.50." in shown.output
        assert "billed" not in listed.output and "estimate $0.50" in listed.output


def test_a_pod_that_never_becomes_reachable_is_terminated(
    hctl_rest_env, runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    hctl_rest_env.ready_after_polls = 10**6
    monkeypatch.setenv("HCTL_READY_TIMEOUT_S", "0.3")
    result = runner.invoke(app, ["run", TINY, "--trials", "2", "--yes"])
    assert result.exit_code == 6, result.output
    assert "so it was terminated: nothing more is billed" in result.output
    assert len(hctl_rest_env.requests_for("create")) == 1
    assert hctl_rest_env.pods == []


def test_a_capacity_error_offers_alternatives_and_creates_nothing(hctl_rest_env, runner) -> None:
    hctl_rest_env.inject_fault("capacity", operation="create")
    result = runner.invoke(app, ["run", TINY, "--trials", "2", "--yes",
                                 "--gpu", "NVIDIA GeForce RTX 4090"])  # fmt: skip
    assert result.exit_code == 4, result.output
    assert "Nothing was created" in result.output
    assert "--gpu 'RTX" in result.output  # cheaper in-stock GPUs with their totals
    assert hctl_rest_env.pods == []


def test_the_smoke_test_estimates_qwen3_4b_and_rents_nothing_unconfirmed(
    hctl_rest_env, runner
) -> None:
    result = runner.invoke(app, ["test", "--trials", "3"])
    assert result.exit_code == 130
    assert "Qwen/Qwen3-4B-Instruct-2507: 4.02B parameters" in result.output
    assert "Estimate for 3 trials" in result.output
    assert hctl_rest_env.pods == []


def test_ctrl_c_while_the_pod_is_being_created_leaves_no_pod_billing(
    hctl_rest_env, runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hctl import pods

    create = pods.create_pod

    def interrupted_create(provider, plan):  # noqa: ANN001, ANN202
        create(provider, plan)  # RunPod applied the create...
        raise KeyboardInterrupt  # ...but Ctrl-C came before its answer did

    monkeypatch.setattr(pods, "create_pod", interrupted_create)
    result = runner.invoke(app, ["run", TINY, "--trials", "2", "--yes"])
    assert result.exit_code == 130, result.output
    assert "terminated pod" in result.output
    assert hctl_rest_env.pods == []


def test_results_show_every_score_and_the_capability_check(runner, tmp_path: Path) -> None:
    """A job whose worker reported named scores and an `evaluation` event (the events a worker
    with the classifier and multi-token KL as objectives writes)."""
    from hctl.services.jobs import JobRecord, JobStore
    from hctl_worker.events import (
        DoneEvent,
        EvaluationEvent,
        EventWriter,
        Measure,
        ParetoEvent,
        TrialEvent,
    )
    from hctl_worker.trials import Score, Trial

    def trial(number: int, refusals: float, kl: float, harmless: float) -> Trial:
        return Trial(
            number=number,
            scores={
                "RefusalClassifier": Score(
                    value=refusals, of=20, direction="minimize", role="refusals"
                ),
                "MultiTokenKL": Score(value=kl, direction="minimize", role="damage"),
                "HarmlessRefusals": Score(
                    value=harmless, of=10, role="harmless_refusals", limit=1.5
                ),
            },
        )

    trials = [trial(1, 18, 0.001, 0), trial(2, 1, 0.02, 0), trial(3, 0, 0.01, 6)]
    store = JobStore()
    store.save(JobRecord(job_id="j1", model="m", worker_model="m", n_trials=3, target="local",
                         remote_job_dir=str(tmp_path), status="finished", chosen_trial=2))  # fmt: skip
    with EventWriter(store.events_path("j1")) as writer:
        for item in trials:
            writer.emit(TrialEvent.of(item, n_trials=3))
        writer.emit(ParetoEvent(trials=[trials[1], trials[0]]))
        writer.emit(
            EvaluationEvent(
                trial=2,
                measures=[
                    Measure(
                        name="perplexity, held-out text", original=8.25, edited=8.5, better="lower"
                    ),
                    Measure(name="RefusalClassifier", original=19, edited=1, of=20, better="lower"),
                ],  # fmt: skip
                notes=["lm-eval tasks not run (piqa): lm_eval is not installed"],
            )
        )
        writer.emit(DoneEvent(results_dir="r", chosen_trial=2))
    output = invoke(runner, "results", "j1").output
    assert "RefusalClassifier ↓" in output and "MultiTokenKL ↓" in output
    assert "HarmlessRefusals" in output and "1/20" in output and "0.0200" in output
    assert "Trial 2 against the original model" in output
    assert "8.2500" in output and "8.5000" in output and "19/20" in output
