"""Where a job's study lives, and the lock its workers take turns under.

Optuna's storages are the distributed engine; hctl adds no coordinator of its own:

- **Journal** (no URL): `study.journal` in the job directory, Optuna's `JournalFileBackend`. Any
  number of workers on one machine share it; each append is made under a system file lock
  (`locks.FileLock`), which a killed worker never leaves behind.
- **PostgreSQL** (`--storage postgresql://USER@HOST:PORT/DATABASE`): Optuna's `RDBStorage`, for
  workers on several machines, each with its own job directory for its log and events. The
  password never goes in the URL on a command line: libpq reads it from `PGPASSWORD` (or a
  `.pgpass` file); a URL that holds one anyway is shown with the password masked, everywhere.

`StudyStorage.exclusive()` is the one lock every worker of a study takes for the few steps that
must not interleave: claiming a trial, numbering and reporting a finished one, queuing the first
trials, failing a stale one. It is held for milliseconds. On the journal it is a file lock on
`study.lock`; on PostgreSQL a transaction-scoped advisory lock on a connection of its own, whose
session the server ends when it sits idle in its transaction for a minute, so a worker whose
machine vanished while holding it blocks the others at most that long.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import BaseJournalFileLock, get_lock_file

from hctl_worker.errors import StorageError
from hctl_worker.line_log import append_lines
from hctl_worker.locks import FileLock

LOCK_FILE = "study.lock"
DATABASE_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
CONNECT_ATTEMPTS = 5  # workers starting together may race to create the schema
LOCK_IDLE_TIMEOUT = "60s"


def _parts(url: str) -> tuple[str, str | None, str | None, str] | None:
    """(scheme, user, password, host and path) of a URL with credentials; None without."""
    scheme, separator, rest = url.partition("://")
    location, slash, path = rest.partition("/")
    if not separator or "@" not in location:
        return None
    credentials, _, host = location.rpartition("@")
    user, has_password, password = credentials.partition(":")
    return scheme, user, password if has_password else None, f"{host}{slash}{path}"


def redact(url: str) -> str:
    """The URL with its password masked (for messages and logs)."""
    parts = _parts(url)
    if parts is None:
        return url
    scheme, user, password, rest = parts
    return f"{scheme}://{user}{':***' if password is not None else ''}@{rest}"


def without_password(url: str) -> str:
    """The URL with no password in it (libpq then reads it from PGPASSWORD)."""
    parts = _parts(url)
    return url if parts is None else f"{parts[0]}://{parts[1]}@{parts[3]}"


def _clean(text: str, url: str) -> str:
    """An error's text without the URL's password, whatever the library put in it."""
    parts = _parts(url)
    cleaned = text.replace(url, redact(url))
    password = parts[2] if parts is not None else None
    return cleaned.replace(password, "***") if password else cleaned


class JournalLock(BaseJournalFileLock):
    """The lock Optuna's journal backend takes for each append: a system file lock, which a
    worker killed mid-append does not leave behind (Optuna's own lock files wait out a grace
    period then)."""

    def __init__(self, path: str) -> None:
        self._lock = FileLock(path)

    def acquire(self) -> bool:
        return self._lock.acquire()

    def release(self) -> None:
        self._lock.release()


@dataclass
class StudyStorage:
    """An Optuna storage with the lock its workers share (see the module docstring)."""

    storage: BaseStorage
    description: str  # for messages: the journal's path or the URL without its password
    _exclusive: Callable[[], contextlib.AbstractContextManager[None]] = field(repr=False)
    _close: Callable[[], None] = field(default=lambda: None, repr=False)

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return self._exclusive()

    def close(self) -> None:
        self._close()


class WholeLineJournal(JournalFileBackend):
    """Optuna's journal file, appended to in whole lines (`line_log`): an append that fails (a
    full disk) leaves no fragment that the next one would merge with, which Optuna's reader
    refuses ("Invalid log format") and a resumed search could not get past."""

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs)
        with get_lock_file(self._lock):
            append_lines(Path(self._file_path), lines.encode("utf-8"))


def journal_storage(journal: Path) -> StudyStorage:
    """The study in a journal file; `study.lock` beside it is the workers' lock."""
    backend = WholeLineJournal(str(journal), lock_obj=JournalLock(f"{journal}.lock"))
    lock = FileLock(journal.with_name(LOCK_FILE))

    @contextlib.contextmanager
    def exclusive() -> Iterator[None]:
        with lock:
            yield

    return StudyStorage(JournalStorage(backend), str(journal), exclusive)


def database_storage(url: str, study_name: str) -> StudyStorage:
    """The study in a PostgreSQL database (Optuna's RDBStorage, psycopg 3 as the driver)."""
    scheme = url.partition("://")[0].lower()
    if scheme not in DATABASE_SCHEMES:
        raise StorageError(
            f"--storage {redact(url)} is not a PostgreSQL URL",
            "Give postgresql://USER@HOST:PORT/DATABASE (the password in PGPASSWORD), or leave "
            "--storage out to keep the study in the job directory.",
        )
    address = "postgresql+psycopg://" + url.partition("://")[2]
    try:
        import sqlalchemy
        from optuna.storages import RDBStorage
    except ImportError as error:  # pragma: no cover - optuna always brings sqlalchemy
        raise StorageError(f"the database driver is missing: {error}") from None
    storage = _connect(lambda: RDBStorage(address, engine_kwargs={"pool_pre_ping": True}), url)
    engine = sqlalchemy.create_engine(address, pool_pre_ping=True)
    key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
    connection: list[Any] = []

    @contextlib.contextmanager
    def exclusive() -> Iterator[None]:
        if not connection:
            connection.append(_connect(engine.connect, url))
        held = connection[0]
        with held.begin():
            held.execute(
                sqlalchemy.text(
                    f"SET LOCAL idle_in_transaction_session_timeout = '{LOCK_IDLE_TIMEOUT}'"
                )
            )
            held.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            yield

    def close() -> None:
        for held in connection:
            with contextlib.suppress(Exception):
                held.close()
        engine.dispose()
        with contextlib.suppress(Exception):
            storage.remove_session()
            storage.engine.dispose()

    return StudyStorage(storage, redact(url), exclusive, close)


def _connect(make: Callable[[], Any], url: str) -> Any:
    """Make a connection (or storage), retrying a few times; errors name the URL without its
    password."""
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        try:
            return make()
        except Exception as error:  # sqlalchemy, psycopg, alembic: all say it in their text
            if attempt == CONNECT_ATTEMPTS:
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise StorageError(
                    f"cannot use the study database {redact(url)}: {_clean(first_line, url)}",
                    "Check that the database server runs and is reachable from this machine, "
                    "and that PGPASSWORD holds the password of that user.",
                ) from None
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def open_storage(journal: Path, url: str | None, study_name: str) -> StudyStorage:
    """The job's study storage: the journal in the job directory, or the database at `url`."""
    if url:
        return database_storage(url, study_name)
    return journal_storage(journal)
