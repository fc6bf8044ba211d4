"""The pod's own deadline: a small process on the pod that stops (or terminates) it when its lease
passes, with nobody else needed: not the worker, not the laptop, not hctl.

It runs on the pod with any Python 3 and the standard library only (it imports nothing else, not
even hctl), so hctl can upload this file and start it before anything is installed, and the
worker image starts it at boot (`images/start.sh`, `python3 -m hctl.watchdog --from-env`).

The lease is a JSON file (hctl writes it; the watchdog reads it again on every round, so moving
the deadline is rewriting the file):

    {"until": 1767225600.0,         the deadline, epoch seconds
     "command": "python3 -c ...",   what stops the pod (from the provider: its own API call)
     "extend_s": 3600,              progress moves the deadline to last progress + extend_s
     "watch": ["/workspace/hctl/jobs/<job>/events.jsonl"],   files whose changes are progress
     "poll_s": 30}

So a job that keeps making progress keeps its pod, and a stuck or forgotten one loses it at
most `extend_s` after its last progress (or at `until`, whichever is later). Removing the lease
file releases the pod (the watchdog exits). Beside the lease file: `watchdog.pid` (one watchdog
per pod: a second one exits at once) and `watchdog.log` (JSON lines: what it decided, when).
A lease that had already passed when the watchdog started (the pod was started again by hand
after its deadline) is not enforced: someone wants that pod now.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_POLL_S = 30.0
RETRY_S = 60.0
COMMAND_TIMEOUT_S = 120.0
DEFAULT_LEASE_FILE = "/workspace/hctl/lease.json"


def deadline(lease: dict[str, Any], now: float) -> tuple[float, float | None]:
    """The deadline in force and the last progress seen (None: none), at `now`."""
    until = float(lease["until"])
    progress = None
    for name in lease.get("watch") or []:
        try:
            changed = os.stat(name).st_mtime
        except OSError:
            continue
        progress = changed if progress is None else max(progress, changed)
    extend = float(lease.get("extend_s") or 0)
    if progress is not None and extend > 0:
        # Only progress up to now counts: a file dated in the future does not keep a pod.
        until = max(until, min(progress, now) + extend)
    return until, progress


class Watchdog:
    """One watchdog over one lease file."""

    def __init__(self, lease_file: Path, *, clock=time.time, sleep=time.sleep) -> None:  # noqa: ANN001
        self.lease_file = lease_file
        self.pid_file = lease_file.with_name("watchdog.pid")
        self.log_file = lease_file.with_name("watchdog.log")
        self.clock = clock
        self.sleep = sleep

    def log(self, event: str, **fields: Any) -> None:
        line = json.dumps({"ts": round(self.clock(), 3), "event": event, **fields})
        with open(self.log_file, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def read_lease(self) -> dict[str, Any] | None:
        try:
            lease = json.loads(self.lease_file.read_text(encoding="utf-8"))
            float(lease["until"])
            str(lease["command"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        return lease

    def another_is_running(self) -> bool:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return False
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ProcessLookupError):
            return False
        return b"watchdog" in command

    def run(self) -> int:
        """Watch until the lease is released or the pod was told to stop; the exit status."""
        if self.another_is_running():
            return 0
        self.pid_file.write_text(f"{os.getpid()}\n")
        lease = self.read_lease()
        if not lease:
            self.log("no-lease", file=str(self.lease_file))
            return 1
        if deadline(lease, self.clock())[0] <= self.clock():
            self.log("expired-before-start", until=lease["until"])
            return 0
        self.log("start", until=float(lease["until"]), pid=os.getpid())
        shown = None
        while True:
            current = self.read_lease()
            if current is None:
                self.log("released")
                return 0
            if current:
                lease = current
            if self.pid_file.read_text().strip() != str(os.getpid()):
                return 0  # a newer watchdog took over
            now = self.clock()
            until, progress = deadline(lease, now)
            if until != shown:
                self.log("deadline", deadline=until, lease_until=float(lease["until"]),
                         progress=progress)  # fmt: skip
                shown = until
            if now >= until:
                if self.act(lease, until):
                    return 0
                self.sleep(RETRY_S if lease.get("poll_s") is None else float(lease["poll_s"]))
                continue
            poll = float(lease.get("poll_s") or DEFAULT_POLL_S)
            self.sleep(max(0.05, min(poll, until - now)))

    def act(self, lease: dict[str, Any], until: float) -> bool:
        """Run the lease's command; True when it succeeded."""
        self.log("acting", deadline=until, command=lease["command"][:80])
        try:
            done = subprocess.run(
                ["/bin/sh", "-c", lease["command"]],
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            self.log("failed", error=str(error))
            return False
        output = (done.stdout + done.stderr).strip()[-500:]
        if done.returncode != 0:
            self.log("failed", status=done.returncode, output=output)
            return False
        self.log("done", output=output)
        return True


def lease_from_environment(path: Path) -> bool:
    """Write the lease file from `HCTL_LEASE_UNTIL` and `HCTL_LEASE_COMMAND` (set when the pod
    was created) unless hctl wrote one already; False when there is no lease to keep."""
    until = os.environ.get("HCTL_LEASE_UNTIL")
    command = os.environ.get("HCTL_LEASE_COMMAND")
    if not until or not command:
        return False
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        lease = {"until": float(until), "command": command,
                 "extend_s": float(os.environ.get("HCTL_LEASE_EXTEND_S") or 0), "watch": []}  # fmt: skip
        path.write_text(json.dumps(lease), encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stop this pod when its lease passes.")
    parser.add_argument("lease_file", nargs="?", default=None, help="The lease (JSON).")
    parser.add_argument(
        "--from-env", action="store_true", help="Take the lease from HCTL_LEASE_* if none."
    )
    arguments = parser.parse_args(argv)
    path = Path(arguments.lease_file or os.environ.get("HCTL_LEASE_FILE") or DEFAULT_LEASE_FILE)
    if arguments.from_env and not lease_from_environment(path):
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return Watchdog(path).run()


if __name__ == "__main__":
    sys.exit(main())
