"""Batch size: the sizes tried, the throughput choice (with an injected clock), and running out
of memory (a real forward hook that fails like CUDA does above a batch size)."""

from __future__ import annotations

import pytest

from hctl_worker.batching import (
    CACHE_FILE,
    cached_batch_size,
    candidate_sizes,
    measure_batch_size,
)
from hctl_worker.errors import OutOfMemoryError
from hctl_worker.model import load_model
from scripts.make_random_model import make_random_model


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = make_random_model(tmp_path_factory.mktemp("models") / "qwen3", "qwen3", hidden=32)
    return load_model(str(path), dtypes=["float32"], device_map="cpu")


def test_candidate_sizes_double_up_to_the_maximum() -> None:
    assert candidate_sizes(1) == [1]
    assert candidate_sizes(8) == [1, 2, 4, 8]
    assert candidate_sizes(12) == [1, 2, 4, 8, 12]
    assert candidate_sizes(128, prompts=20) == [1, 2, 4, 8, 16, 20]
    with pytest.raises(ValueError):
        candidate_sizes(0)


class SteppingClock:
    """Each timed run takes the next duration from the list (start and end are two calls)."""

    def __init__(self, durations: list[float]) -> None:
        self.durations = list(durations)
        self.now = 0.0
        self.started = False

    def __call__(self) -> float:
        if self.started:
            self.now += self.durations.pop(0)
        self.started = not self.started
        return self.now


def test_the_fastest_size_wins_not_the_largest(loaded) -> None:
    texts = loaded.template(["hi", "hello there"] * 4, None)
    # tokens/s (as many tokens per row) for sizes 1, 2, 4, 8: 1, 2, 4, 1.6 -> 4, and 8 ends the sweep (below 70 %).
    clock = SteppingClock([1.0, 1.0, 1.0, 5.0])
    messages: list[str] = []
    choice = measure_batch_size(
        loaded, texts, max_batch_size=64, on_message=messages.append, clock=clock, max_new_tokens=2
    )
    assert choice.size == 4 and sorted(choice.tokens_per_second) == [1, 2, 4, 8]
    assert clock.durations == []
    assert messages[-1] == "chose batch size 4"


def test_out_of_memory_stops_at_the_last_size_that_fit(loaded) -> None:
    def fail_above_two(module, args, kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    handle = loaded.model.register_forward_pre_hook(fail_above_two, with_kwargs=True)
    try:
        texts = loaded.template(["hi"] * 4, None)
        clock = SteppingClock([1.0, 1.0])  # sizes 1 and 2 fit; 2 is faster
        choice = measure_batch_size(loaded, texts, max_batch_size=16, max_new_tokens=2, clock=clock)
        assert choice.size == 2
        assert clock.durations == []
    finally:
        handle.remove()


def test_out_of_memory_at_size_one_is_an_error(loaded) -> None:
    def always_fail(module, args, kwargs):
        raise RuntimeError("CUDA out of memory.")

    handle = loaded.model.register_forward_pre_hook(always_fail, with_kwargs=True)
    try:
        with pytest.raises(OutOfMemoryError):
            measure_batch_size(loaded, loaded.template(["hi"], None), max_batch_size=4)
    finally:
        handle.remove()


def test_the_measurement_is_kept_for_the_job_and_remeasured_for_other_prompts(
    loaded, tmp_path
) -> None:
    texts = loaded.template(["hi", "hello there", "what is this"], None)
    passes = []
    handle = loaded.model.register_forward_pre_hook(lambda *args: passes.append(1))
    try:
        measured = cached_batch_size(tmp_path, loaded, texts, max_batch_size=4)
        after_measuring = len(passes)
        again = cached_batch_size(tmp_path, loaded, texts, max_batch_size=4)
        assert len(passes) == after_measuring  # read back, nothing run
        other = cached_batch_size(tmp_path, loaded, texts[:2], max_batch_size=4)
        assert len(passes) > after_measuring
    finally:
        handle.remove()
    assert after_measuring > 0 and not measured.cached
    assert again.cached and again.size == measured.size
    assert again.tokens_per_second == measured.tokens_per_second
    # A sweep may end early when throughput falls (timing); it never goes past the prompts.
    assert measured.size in measured.tokens_per_second
    assert set(measured.tokens_per_second) <= {1, 2, 3}
    assert not other.cached and set(other.tokens_per_second) <= {1, 2}
    assert "tokens/s by size" in again.describe()
    (tmp_path / CACHE_FILE).write_text("{not json")
    assert not cached_batch_size(tmp_path, loaded, texts[:2], max_batch_size=4).cached


def test_a_job_measures_its_batch_size_once_and_logs_the_figures(tmp_path) -> None:
    from tests.worker.test_end_to_end import run_events, write_fixture_config

    config = write_fixture_config(
        tmp_path / "config.toml", n_trials=1, evaluation_split="[:8]", batch_size=0,
        max_batch_size=8, max_response_length=4,
    )  # fmt: skip
    job = tmp_path / "job"

    def batch_size_stage(events: list[dict]) -> str:
        return next(
            event["message"]
            for event in events
            if event["type"] == "stage"
            and event["stage"] == "batch_size"
            and event["state"] == "end"
        )

    first = batch_size_stage(run_events("--config", str(config), "--job-dir", str(job)))
    assert first.startswith("batch size ") and "tokens/s by size: 1: " in first
    assert (job / CACHE_FILE).is_file()
    again = run_events("--config", str(config), "--job-dir", str(job), "--n-trials", "2")
    assert batch_size_stage(again) == first.replace("(tokens/s", "(from the job's cache; tokens/s")
    fixed = run_events(
        "--config", str(config), "--job-dir", str(job), "--n-trials", "3", "--batch-size", "3"
    )
    assert batch_size_stage(fixed) == "batch size 3 (set)"
