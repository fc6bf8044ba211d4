"""Local job records."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hctl.errors import JobError
from hctl.services.jobs import JobRecord, JobStore, new_job_id


def record(job_id: str) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        model="m",
        worker_model="m",
        n_trials=3,
        target="local",
        remote_job_dir="/tmp/x",
    )


def test_records_round_trip_and_list_in_order(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.save(record("0101-0000-aaaa"))
    store.save(record("0102-0000-bbbb"))
    store.update("0101-0000-aaaa", status="finished", chosen_trial=2)
    loaded = store.load("0101-0000-aaaa")
    assert loaded.status == "finished" and loaded.chosen_trial == 2
    assert [item.job_id for item in store.list()] == ["0101-0000-aaaa", "0102-0000-bbbb"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_unknown_job_names_the_recent_ones(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    with pytest.raises(JobError) as raised:
        store.load("nope")
    assert "hctl run" in raised.value.hint
    store.save(record("0101-0000-aaaa"))
    with pytest.raises(JobError) as raised:
        store.load("nope")
    assert "0101-0000-aaaa" in raised.value.hint


def test_damaged_records_are_skipped_by_the_listing(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.save(record("0101-0000-aaaa"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "job.json").write_text("{not json")
    assert [item.job_id for item in store.list()] == ["0101-0000-aaaa"]


def test_job_ids_sort_by_time_and_differ() -> None:
    assert re.fullmatch(r"0101-0000-[0-9a-f]{4}", new_job_id(0))
    assert new_job_id(86400 * 40) > new_job_id(0)
