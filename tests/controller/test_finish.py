"""Finishing a job: which trial is saved when the user chooses it at the prompt."""

from __future__ import annotations

from hctl.services.finish import pick_trial
from hctl.services.jobs import JobRecord
from hctl.services.progress import JobProgress
from hctl_worker.events import TrialEvent


def test_a_trial_number_not_finished_is_asked_again_not_replaced_by_the_best() -> None:
    """At the "Trial to save" prompt a typo (999) once saved the automatic choice instead."""
    progress = JobProgress()
    for number, refusals, kl in ((1, 0, 0.4), (2, 5, 0.1), (3, 9, 0.9)):
        progress.apply(TrialEvent(number=number, n_trials=3, params={}, kl=kl,
                                  refusals=refusals, total_bad=10, seconds=1.0))  # fmt: skip
    record = JobRecord(job_id="1130-0000-abcd", model="m", worker_model="m", n_trials=3,
                       target="local", remote_job_dir="/jobs/a")  # fmt: skip
    answers, notes = iter([999, 3]), []
    chosen = pick_trial(record, progress, lambda front, suggested: next(answers), notes.append)
    assert chosen is not None and chosen.number == 3  # off the front, but finished: allowed
    assert notes == [
        "there is no finished trial 999: the front holds 1, 2 (any finished trial may be saved)"
    ]
