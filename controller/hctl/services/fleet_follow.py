"""Following, stopping and releasing a job on several pods (see `fleet`) as one job.

- `FleetFollower` reads every pod's events (one `Follower` per pod, by byte offset, each pod's
  copy at home in `pods/K.events.jsonl`) and hands the follow loop one poll: the events of all
  pods (merged into `events.jsonl`), alive while any pod's workers are. A pod that stops
  answering is looked up at the provider: gone, stopped or failed, it is left out from then on
  (the study lives in PostgreSQL on pod 1, so the others go on, and the trial it was running is
  run again by another worker); merely unreachable, it is read again on the next poll. When pod 1
  itself is lost, the study's database went with it: `DatabaseLostError`.
- A lost pod may take with it the lines of trials it finished and reported just before (the
  study has them; its events file never reached here). After a pod is lost, and once the search
  has ended, the study's finished trials are read on the first pod (`hctl-worker trials`), and
  those no pod's events brought (while the search runs: those the lost pods' workers ran) come
  as trial events of the poll: shown, copied home, counted.
- `stop_workers` stops every pod's workers; `release_pods` stops, terminates or keeps every pod
  as the job says, and says which, pod by pod.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from hctl.errors import HctlError, PodNotFoundError, PodNotReadyError, RemoteError
from hctl.providers.base import PodStatus
from hctl.services.finish import release_machine
from hctl.services.fleet import pod_view, pod_views
from hctl.services.follow import Follower, Poll
from hctl.services.job_protocol import parse_study_trials, study_trials_command
from hctl.services.jobs import JobRecord, PodMember
from hctl.services.planning import Notify
from hctl.services.stopping import stop_worker
from hctl.services.toolkit import Toolkit
from hctl_worker.events import TrialEvent, encode, read_events

STUDY_READ_TIMEOUT_S = 300


class DatabaseLostError(PodNotReadyError):
    """The pod that holds the study's database is gone, stopped or failed."""


class FleetFollower:
    """One follower for all the pods of a job (same interface as `Follower`)."""

    def __init__(
        self,
        record: JobRecord,
        toolkit: Toolkit,
        make_follower: Callable[[JobRecord, int], Follower],
        notify: Notify,
        shown: set[int],
        read_study: Callable[[], list[TrialEvent]] | None = None,
    ) -> None:
        """`shown`: the numbers of the trials the job's events at home already hold (what the
        caller read to find its offset; see `trial_numbers`)."""
        self.record = record
        self.toolkit = toolkit
        self.notify = notify
        self._read_study = read_study or (lambda: study_trials(record, toolkit))
        self._followers: dict[int, Follower] = {}
        self._unreachable: set[int] = set()
        self._read_study_pending = False  # a pod was lost: read the study at the end of this poll
        self._shown = set(shown)
        for index, member in enumerate(record.members):
            if not member.lost:
                _, offset = read_events(toolkit.store.member_events_path(record.job_id, index))
                self._followers[index] = make_follower(pod_view(record, member), offset)

    def poll(self) -> Poll:
        merged = Poll(worker_alive=None)
        states: list[bool | None] = []
        for index, follower in list(self._followers.items()):
            try:
                poll = follower.poll()
            except HctlError as error:
                self._check_member(index, error)
                continue
            if index in self._unreachable:
                self._unreachable.discard(index)
                self.notify(f"pod {self.record.members[index].pod_id} answers again")
            merged.events.extend(poll.events)
            merged.raw += poll.raw
            merged.parts[index] = poll.raw
            states.append(poll.worker_alive)
        if any(state is True for state in states):
            merged.worker_alive = True
        elif states and all(state is False for state in states):
            merged.worker_alive = False
        self._note_shown(merged)
        if self._read_study_pending:
            self._read_study_pending = False
            self._add_unreported(merged, lost_workers(self.record))
        return merged

    def recover(self) -> Poll:
        """The study's finished trials that no pod's events brought (the search has ended).
        Only when a pod was lost or did not answer at the end: every other pod's events were
        read up to its workers' last."""
        poll = Poll(worker_alive=None)
        if self._unreachable or lost_workers(self.record):
            self._add_unreported(poll, None)
        return poll

    def _note_shown(self, poll: Poll) -> None:
        self._shown.update(trial_numbers(poll.events))

    def _add_unreported(self, poll: Poll, workers: set[str] | None) -> None:
        """Add to `poll` the trials the study holds that no event brought here, those of
        `workers` only (None: any worker's; the other pods' lines may simply not be read yet)."""
        try:
            found = self._read_study()
        except HctlError as error:
            self.notify(
                f"could not read the study's trials on pod {self.record.members[0].pod_id} "
                f"({error.message}): a trial a lost pod finished may be missing here (it is "
                "in the study)"
            )
            return
        missing = [
            event
            for event in found
            if event.number not in self._shown and (workers is None or event.worker in workers)
        ]
        if not missing:
            return
        numbers = ", ".join(str(event.number) for event in missing)
        self.notify(
            f"read from the study: trial {numbers}, finished on a pod that was lost or stopped "
            "answering before its report of it arrived"
        )
        for event in missing:
            poll.events.append(event)
            poll.raw += encode(event).encode() + b"\n"
        self._note_shown(poll)

    def _check_member(self, index: int, error: HctlError) -> None:
        """A pod that did not answer: lost when the provider says it no longer runs."""
        member = self.record.members[index]
        status = lost_status(self.toolkit, member.pod_id)
        if status is None:
            if index not in self._unreachable:
                self._unreachable.add(index)
                self.notify(f"pod {member.pod_id} does not answer ({error.message}); retrying")
            return
        self._followers.pop(index).close()
        member.lost = f"{status} mid-search"
        self.toolkit.store.save(self.record)
        if index == 0:
            raise DatabaseLostError(database_lost_message(self.record, member, status))
        self._read_study_pending = True
        self.notify(
            f"pod {member.pod_id} is {status}: the other pods go on with the search (its "
            "running trial is run again by another worker)"
        )

    def fetch(self, name: str, local_path: object) -> bool:  # the interface of `Follower`
        return False

    def close(self) -> None:
        for follower in self._followers.values():
            follower.close()


def trial_numbers(events: Iterable[object]) -> set[int]:
    """The numbers of the trials these events report."""
    return {event.number for event in events if isinstance(event, TrialEvent)}


def lost_workers(record: JobRecord) -> set[str]:
    """The names of the workers of the job's lost pods."""
    return {
        str(member.first_worker + offset)
        for member in record.members
        if member.lost
        for offset in range(record.workers)
    }


def study_trials(record: JobRecord, toolkit: Toolkit) -> list[TrialEvent]:
    """Every finished trial of the job's study, as trial events, read on the first pod."""
    first = pod_view(record, record.members[0])
    remote = toolkit.connect(first)
    try:
        command = study_trials_command(record.worker_command, first.remote_job_dir)
        result = remote.run(command, timeout=STUDY_READ_TIMEOUT_S)
    finally:
        remote.close()
    if result.exit_code != 0:
        raise RemoteError(f"`hctl-worker trials` failed: {result.output.strip()[-300:]}")
    return parse_study_trials(result.output)


def lost_status(toolkit: Toolkit, pod_id: str) -> str | None:
    """The status of a pod that no longer runs (gone: terminated); None while it runs."""
    try:
        pod = toolkit.provider().get(pod_id)
    except PodNotFoundError:
        return str(PodStatus.TERMINATED)
    return None if pod.active else str(pod.status)


def check_database_pod(record: JobRecord, toolkit: Toolkit) -> None:
    """Raise `DatabaseLostError` when the first pod (the study's database) no longer runs."""
    first = record.members[0]
    status = lost_status(toolkit, first.pod_id)
    if status is None:
        return
    first.lost = f"{status} mid-search"
    toolkit.store.save(record)
    raise DatabaseLostError(database_lost_message(record, first, status))


def database_lost_message(record: JobRecord, member: PodMember, status: str) -> str:
    """What the user must know when pod 1 (the database) is lost."""
    if status == str(PodStatus.TERMINATED):
        kept = (
            "its volume went with it, and the study's database too; every trial reported so far "
            f"is in the events on this computer (`hctl results {record.job_id}`)"
        )
    else:
        kept = (
            f"its volume keeps the study's database ({record.database_dir}); "
            f"`hctl resume {record.job_id}` starts the pods and the database again"
        )
    return (
        f"pod {member.pod_id}, which held the study's database, is {status}: the other pods "
        f"cannot go on without it and are released; {kept}"
    )


def stop_workers(record: JobRecord, toolkit: Toolkit, notify: Notify) -> list[str]:
    """Stop every pod's workers (see `stopping.stop_worker`); returns each pod's outcome."""
    states = []
    for view in pod_views(record):
        try:
            remote = toolkit.connect(view)
        except HctlError as error:
            where = f"pod {view.pod_id}" if record.members else "the machine"
            notify(f"could not reach {where} ({error.message}); releasing it anyway")
            continue
        try:
            states.append(stop_worker(remote, view.remote_job_dir, toolkit))
        finally:
            remote.close()
    return states


def release_pods(record: JobRecord, toolkit: Toolkit, notify: Notify) -> JobRecord:
    """Stop, terminate or keep every pod of the job as it says, and say which, pod by pod; a
    pod the provider would not release is listed in `unreleased_pods` and the rest go on."""
    record = record.model_copy(update={"unreleased_pods": []})
    if not record.members:
        return release_machine(record, toolkit, notify)
    unreleased: list[str] = []
    for view, member in zip(pod_views(record, with_lost=True), record.members, strict=True):
        if member.lost:
            try:
                pod = toolkit.provider().get(member.pod_id)
            except PodNotFoundError:
                notify(f"pod {member.pod_id} is gone (it was {member.lost})")
                continue
            except HctlError:
                pass  # release_machine says what the provider answers
            else:
                if not pod.active and record.after != "terminate":
                    notify(f"pod {member.pod_id} is {pod.status} (it was {member.lost})")
                    continue
        unreleased += release_machine(view, toolkit, notify).unreleased_pods
    return record.model_copy(update={"unreleased_pods": unreleased})


def any_alive(record: JobRecord, alive: Callable[[JobRecord], bool | None]) -> bool | None:
    """Whether any pod's workers run (None: no pod could be asked)."""
    states = [alive(view) for view in pod_views(record)]
    if any(state is True for state in states):
        return True
    return False if any(state is False for state in states) else None
