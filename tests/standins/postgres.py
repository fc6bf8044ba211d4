"""A real PostgreSQL server on 127.0.0.1 with a temporary data directory.

Started by hctl's own start script (`hctl.services.database.start_command`, the one the first
pod of a several-pod job runs), so the tests check that script too. Debian's `postgresql`
package provides the binaries (`.ci/run` installs it); where they are missing, the tests that
need the server are skipped with the reason. As root the script runs the server as `postgres`,
as on a pod.

- `postgres_server` (session): `.database(name)` makes a new database with its own user and
  password and returns its `hctl.services.database.Database` (`.url` has no password; give
  `.password` as PGPASSWORD).
"""

from __future__ import annotations

import glob
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hctl.services.database import Database, new_database, setup_sql, start_command, stop_command


def postgres_missing() -> str | None:
    """Why no server can be started here, or None."""
    if not (shutil.which("pg_ctl") or glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")):
        return "PostgreSQL is not installed (apt-get install postgresql)"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PostgresServer:
    root: Path
    data_dir: Path
    port: int

    def database(self, name: str) -> Database:
        """A new database and user of that name, with a fresh password."""
        database = new_database(name, port=self.port)
        sql = self.root / f"{database.name}.sql"
        sql.write_text(setup_sql(database))
        sql.chmod(0o600)
        run(start_command(str(self.data_dir), str(sql), port=self.port, listen="127.0.0.1"))
        return database

    def stop(self) -> None:
        run(stop_command(str(self.data_dir)))


def run(script: str) -> None:
    completed = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120)
    if completed.returncode != 0:
        raise RuntimeError(f"PostgreSQL script failed: {completed.stdout}{completed.stderr}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    reason = postgres_missing()
    if reason is not None:
        pytest.skip(reason)
    # Not under pytest's own temporary folder: its folders are private to root, and the server
    # runs as another user.
    root = Path(tempfile.mkdtemp(prefix="hctl-postgres-"))
    server = PostgresServer(root=root, data_dir=root / "data", port=free_port())
    run(start_command(str(server.data_dir), str(root / "none.sql"), port=server.port,
                      listen="127.0.0.1"))  # fmt: skip
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)
