"""The database the workers of a several-pod job share: PostgreSQL on the job's first pod.

Status: `hctl run --pods N` does not exist yet; today the tests' PostgreSQL stand-in
(`tests/standins/postgres.py`) starts its server with this module's script, so the script is
tested, and `hctl-worker run --storage postgresql://...` is how workers join such a study.

Optuna's `RDBStorage` is the distributed engine; this module only gets a server going. The first
pod runs it from its volume (`<volume>/hctl/databases/<job id>/`), so a stopped pod keeps the
study. Each job has its own database, user and password. The password is made here, reaches the
pod inside a 0600 SQL file that the start script feeds to `psql` on its standard input and then
deletes, reaches the workers through their secrets file (`PGPASSWORD`), and never appears in a
command line, an event or a log: the URL the workers get has no password in it.

The server refuses to run as root, as pods run everything: the start script runs it as the
`postgres` user then (the Debian package, which the pod image installs, creates that user).
"""

from __future__ import annotations

import re
import secrets
import shlex
from dataclasses import dataclass

DEFAULT_PORT = 5432
# Where pg_ctl and friends are: on PATH, else the Debian package's versioned folder.
FIND_BINARIES = (
    "BIN=$(command -v pg_ctl 2>/dev/null || "
    "ls -d /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -n 1 || true); "
    'BIN=$(dirname "$(readlink -f "$BIN" 2>/dev/null || echo /nowhere/pg_ctl)")'
)
NOT_INSTALLED_EXIT = 3


@dataclass(frozen=True)
class Database:
    """One job's database: where it is and who may use it (the password stays in memory)."""

    name: str  # the database and its user, e.g. hctl_0612_0930_a1b2
    host: str
    port: int
    password: str

    @property
    def url(self) -> str:
        """The URL the workers get: no password (they read PGPASSWORD)."""
        return f"postgresql://{self.name}@{self.host}:{self.port}/{self.name}"

    def at(self, host: str, port: int | None = None) -> Database:
        """The same database as reached from elsewhere (a private address, a public port)."""
        return Database(self.name, host, port if port is not None else self.port, self.password)


def new_database(job_id: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> Database:
    name = "hctl_" + re.sub(r"[^a-z0-9_]", "_", job_id.lower())
    return Database(name=name, host=host, port=port, password=secrets.token_hex(24))


def setup_sql(database: Database) -> str:
    """What creates the job's user and database (its password inside: a 0600 file only)."""
    return (
        f"CREATE ROLE {database.name} LOGIN PASSWORD '{database.password}';\n"
        f"CREATE DATABASE {database.name} OWNER {database.name};\n"
    )


def start_command(data_dir: str, sql_file: str, *, port: int, listen: str = "*") -> str:
    """A POSIX shell script that starts the job's server (creating it the first time) and runs
    the setup SQL file once, deleting it. Run it again after a pod restart: it starts the
    server again. Exits 3 when PostgreSQL is not installed."""
    data = shlex.quote(data_dir)
    sql = shlex.quote(sql_file)
    options = shlex.quote(f"-p {int(port)} -h {listen} -k {data_dir}")
    return (
        "set -e; "
        f"{FIND_BINARIES}; "
        f'if [ ! -x "$BIN/pg_ctl" ]; then echo "hctl: PostgreSQL is not installed here '
        f'(apt-get install postgresql)"; exit {NOT_INSTALLED_EXIT}; fi; '
        'if [ "$(id -u)" = 0 ]; then AS="runuser -u postgres --"; else AS=""; fi; '
        f"mkdir -p {data}; chmod 700 {data}; "
        # The server's user must reach its folder: the folders above it are made passable
        # (traversable, not readable).
        f'if [ -n "$AS" ]; then chown postgres {data}; P=$(dirname {data}); '
        'while [ "$P" != / ]; do chmod o+x "$P" 2>/dev/null || true; P=$(dirname "$P"); done; fi; '
        f'if [ ! -f {data}/PG_VERSION ]; then $AS "$BIN/initdb" -D {data} -U postgres '
        "--auth-local=trust --auth-host=scram-sha-256 >/dev/null; "
        f"echo 'host all all 0.0.0.0/0 scram-sha-256' >>{data}/pg_hba.conf; fi; "
        f'if ! $AS "$BIN/pg_ctl" -D {data} status >/dev/null 2>&1; then '
        f'$AS "$BIN/pg_ctl" -D {data} -l {data}/server.log -w -t 60 -o {options} start >/dev/null; '
        "fi; "
        f'if [ -f {sql} ]; then $AS "$BIN/psql" -h {data} -p {int(port)} -U postgres -d postgres '
        f"-q -v ON_ERROR_STOP=1 <{sql} >/dev/null; rm -f {sql}; fi"
    )


def stop_command(data_dir: str) -> str:
    """Stop the server (fast: open transactions are rolled back); nothing when it is not up."""
    data = shlex.quote(data_dir)
    return (
        f"{FIND_BINARIES}; "
        'if [ "$(id -u)" = 0 ]; then AS="runuser -u postgres --"; else AS=""; fi; '
        f'if [ -x "$BIN/pg_ctl" ] && [ -f {data}/PG_VERSION ]; then '
        f'$AS "$BIN/pg_ctl" -D {data} -m fast -w stop >/dev/null 2>&1 || true; fi'
    )
