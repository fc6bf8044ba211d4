"""How the workers sharing one study know of each other, through the study alone.

No coordinator: everything one worker must know of the others is in the study's storage.

- Who runs a trial: its system attribute `hctl:owner` (the worker's machine, job directory and
  name, unique among the study's workers).
- Whether that worker is alive: the trial's heartbeat, a counter in its system attribute
  `hctl:beat` that a thread of the worker raises every `heartbeat_s`. A trial whose beat stands
  still for `stale_after_s` by another worker's own clock (no clocks compared across machines),
  or whose owner has been started again, was abandoned.
- Which finished trials have their events written: study system attributes
  `hctl:reported:<number>`, so a trial a worker told the study but died before reporting is
  reported by the next worker, once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial

OWNER_ATTR = "hctl:owner"
BEAT_ATTR = "hctl:beat"
REPORTED_PREFIX = "hctl:reported:"


@dataclass
class Teamwork:
    """How one worker takes part in a study that others may share.

    `owner` identifies this worker among all of the study's (its machine, job directory and
    name); `name` is what events show. The clock and sleep are injectable for tests.
    """

    name: str = "1"
    owner: str = "1"
    heartbeat_s: float = 10.0
    stale_after_s: float = 60.0
    wait_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    _beats_seen: dict[int, tuple[Any, float]] = field(default_factory=dict)

    def claim(self, study: optuna.Study, trial_id: int) -> None:
        study._storage.set_trial_system_attr(trial_id, OWNER_ATTR, self.owner)

    def stale(self, trial: FrozenTrial) -> bool:
        """Whether a running trial was abandoned: its worker was started again (same owner) or
        its beat has stood still for `stale_after_s` as this worker saw it."""
        if trial.system_attrs.get(OWNER_ATTR) == self.owner:
            return True
        beat = trial.system_attrs.get(BEAT_ATTR)
        now = self.clock()
        seen = self._beats_seen.get(trial._trial_id)
        if seen is None or seen[0] != beat:
            self._beats_seen[trial._trial_id] = (beat, now)
            return False
        return now - seen[1] >= self.stale_after_s

    @contextlib.contextmanager
    def beating(self, study: optuna.Study, trial_id: int) -> Iterator[None]:
        """Beat for a running trial, from a thread of its own, until the block ends."""
        stop = threading.Event()

        def beat() -> None:
            count = 0
            while not stop.wait(self.heartbeat_s):
                count += 1
                with contextlib.suppress(Exception):  # finished meanwhile, or a lost connection
                    study._storage.set_trial_system_attr(trial_id, BEAT_ATTR, count)

        thread = threading.Thread(target=beat, name="hctl-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=max(1.0, self.heartbeat_s))


def reported_numbers(study: optuna.Study) -> set[int]:
    attributes = study._storage.get_study_system_attrs(study._study_id)
    return {
        int(key.removeprefix(REPORTED_PREFIX))
        for key, value in attributes.items()
        if key.startswith(REPORTED_PREFIX) and value
    }


def mark_reported(study: optuna.Study, numbers: set[int]) -> None:
    for number in sorted(numbers):
        study._storage.set_study_system_attr(study._study_id, f"{REPORTED_PREFIX}{number}", True)


def forget_reports(study: optuna.Study, numbers: set[int]) -> None:
    """Take back the marks of trials whose events are not where the marks say (a job directory
    restored from copies): the next turn reports them again. Called holding the lock."""
    for number in numbers:
        study._storage.set_study_system_attr(study._study_id, f"{REPORTED_PREFIX}{number}", None)
