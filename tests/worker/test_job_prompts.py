"""A job's prompt sets when the hub cannot be reached: heretic's default datasets come from the
prompts bundled with the worker on the job's first run (said, and recorded in the job directory),
and every later run takes the same prompts; anything else the hub cannot give stays an error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hctl_worker.errors import PromptError
from hctl_worker.job_prompts import BUNDLED_DIR, BUNDLED_FILES, RECORD_FILE, load_prompt_sets
from hctl_worker.prompt_source import PROMPT_TABLES
from hctl_worker.settings import WorkerSettings
from tests.conftest import REPO_ROOT


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub is out of reach (offline mode: huggingface_hub refuses at once)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "datasets", None)  # the huggingface_hub path


def _settings(**values: object) -> WorkerSettings:
    return WorkerSettings.model_validate({"model": "m", **values})


def _bundled(table: str) -> list[str]:
    return (BUNDLED_DIR / BUNDLED_FILES[table]).read_text(encoding="utf-8").splitlines()


def test_the_bundled_prompts_are_those_the_project_writes() -> None:
    sys.path.insert(0, str(REPO_ROOT))
    from scripts.real_refuser_data import build_prompt_split

    files = build_prompt_split(0).as_files()
    for table, name in BUNDLED_FILES.items():
        assert _bundled(table) == files[name.removesuffix(".txt")], table


def test_a_first_run_without_the_hub_takes_the_bundled_prompts_says_so_and_records_it(
    tmp_path: Path,
) -> None:
    notes: list[str] = []
    settings = _settings(bad_evaluation_prompts={"dataset": "mlabonne/harmful_behaviors",
                                                 "split": "test[:40]"})  # fmt: skip
    sets = load_prompt_sets(settings, tmp_path, notes.append, first_run=True)
    assert sets.good == _bundled("good_prompts")  # train[:400] of 256 lines: all
    assert sets.bad_evaluation == _bundled("bad_evaluation_prompts")[:40]  # the slice is kept
    assert len(sets.bad) == 160 and len(sets.good_evaluation) == 100
    (note,) = notes
    assert note.startswith("the hub cannot be reached (good_prompts: dataset mlabonne/")
    assert "bundled with hctl-worker" in note and "bad_evaluation_prompts 40" in note
    recorded = json.loads((tmp_path / RECORD_FILE).read_text())
    assert recorded == dict.fromkeys(PROMPT_TABLES, "bundled")
    # A later run (a resume, the capability check) takes the same prompts, and says nothing.
    again = load_prompt_sets(settings, tmp_path, notes.append)
    assert again == sets and len(notes) == 1


def test_a_set_of_the_users_own_is_never_replaced(tmp_path: Path) -> None:
    """A hub dataset the user chose, out of reach: the error, not the bundle; a local file is
    read as it is, and recorded as the settings' own."""
    mine = tmp_path / "harmful.txt"
    mine.write_text("first harmful\nsecond harmful\n", encoding="utf-8")
    chosen = _settings(good_prompts={"dataset": "someone/own_prompts", "split": "train"})
    with pytest.raises(PromptError, match="someone/own_prompts"):
        load_prompt_sets(chosen, tmp_path / "a", first_run=True)
    local = _settings(bad_prompts={"dataset": str(mine)})
    (tmp_path / "b").mkdir()
    sets = load_prompt_sets(local, tmp_path / "b", first_run=True)
    assert sets.bad == ["first harmful", "second harmful"]
    recorded = json.loads((tmp_path / "b" / RECORD_FILE).read_text())
    assert recorded["bad_prompts"] == "settings" and recorded["good_prompts"] == "bundled"


def test_a_job_that_took_the_hubs_prompts_does_not_switch_later(tmp_path: Path) -> None:
    """Its record says the sets came from the settings (or it has none: a job that already ran
    trials): without the hub it fails as it always did, with the hint."""
    (tmp_path / RECORD_FILE).write_text(json.dumps(dict.fromkeys(PROMPT_TABLES, "settings")))
    with pytest.raises(PromptError) as raised:
        load_prompt_sets(_settings(), tmp_path, first_run=True)
    assert "offline" in raised.value.message and raised.value.hint
    with pytest.raises(PromptError):
        load_prompt_sets(_settings(), tmp_path / "no-record")  # not a first run: no bundle


def test_the_workers_of_a_jobs_other_pods_take_the_prompts_its_first_run_chose(
    tmp_path: Path,
) -> None:
    """Each pod has its own job directory; the study, which they share, carries the choice. A pod
    whose worker starts after the search has trials takes the bundle too (and keeps a record of
    its own); a choice of the hub's prompts is followed the same way."""
    import optuna

    from hctl_worker.study import StudyPromptRecord

    study = optuna.create_study(directions=["minimize", "minimize"])
    pod_1, pod_2 = tmp_path / "pod-1", tmp_path / "pod-2"
    pod_1.mkdir(), pod_2.mkdir()
    first = load_prompt_sets(_settings(), pod_1, first_run=True, shared=StudyPromptRecord(study))
    assert StudyPromptRecord(study).read() == dict.fromkeys(PROMPT_TABLES, "bundled")
    later = load_prompt_sets(_settings(), pod_2, first_run=False, shared=StudyPromptRecord(study))
    assert later == first
    assert json.loads((pod_2 / RECORD_FILE).read_text()) == dict.fromkeys(PROMPT_TABLES, "bundled")
    # Without the shared record (or with one naming the hub) the late pod cannot bundle.
    with pytest.raises(PromptError):
        load_prompt_sets(_settings(), tmp_path / "pod-3", first_run=False)
    hub = optuna.create_study()
    StudyPromptRecord(hub).write(dict.fromkeys(PROMPT_TABLES, "settings"))
    (tmp_path / "pod-4").mkdir()
    with pytest.raises(PromptError):
        load_prompt_sets(
            _settings(), tmp_path / "pod-4", first_run=True, shared=StudyPromptRecord(hub)
        )
