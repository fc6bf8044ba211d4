"""Benchmark the two SSH paths against a local sshd: command round trip and transfer speed.

    python scripts/bench_remote.py [--megabytes 50] [--round-trips 50]

Starts its own sshd pair on 127.0.0.1 (the test fixture's plain and PTY-only modes, in a temporary
folder), then measures for the proxy path (PTY shell, framed commands, base64 through the
terminal) and the direct path (exec channels, SFTP):

- round trip: median and 90th percentile wall time of `true` on an open connection,
- first command: connect + authenticate + (proxy) shell setup + `true`,
- upload and download of a file of random bytes, sha256-verified, in MB/s (1 MB = 10^6 bytes).

Loopback numbers show the overhead of each path itself; a real pod adds the network's latency
to every round trip and its bandwidth to every transfer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hctl.remote.direct import DirectRemote  # noqa: E402
from hctl.remote.hostkeys import KnownHosts  # noqa: E402
from hctl.remote.proxy import ProxyRemote  # noqa: E402
from hctl.remote.ssh import SshAddress, SshConnection  # noqa: E402
from tests.standins.sshd import make_sshd  # noqa: E402


def measure(remote_class: type, server, root: Path, source: Path, round_trips: int) -> dict:  # noqa: ANN001
    address = SshAddress(user=server.user, host=server.host, port=server.port)
    connection = SshConnection(
        address, key_path=server.client_key_path, known_hosts=KnownHosts(root / "known_hosts")
    )
    remote = remote_class(connection)
    started = time.perf_counter()
    remote.run("true")
    first = time.perf_counter() - started
    timings = []
    for _ in range(round_trips):
        started = time.perf_counter()
        remote.run("true")
        timings.append(time.perf_counter() - started)
    size = source.stat().st_size
    destination = root / f"upload-{remote_class.__name__}.bin"
    started = time.perf_counter()
    remote.put(source, str(destination))
    upload = time.perf_counter() - started
    started = time.perf_counter()
    remote.get(str(source), root / f"download-{remote_class.__name__}.bin")
    download = time.perf_counter() - started
    assert destination.read_bytes() == source.read_bytes()
    remote.close()
    timings.sort()
    return {
        "first": first,
        "median": statistics.median(timings),
        "p90": timings[int(len(timings) * 0.9) - 1],
        "upload": size / upload / 1e6,
        "download": size / download / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--round-trips", type=int, default=50)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hctl-bench-") as folder:
        root = Path(folder)
        plain = make_sshd(root / "plain", mode="plain")
        proxy = make_sshd(root / "proxy", mode="proxy", client_key_path=plain.client_key_path)
        try:
            source = root / "source.bin"
            source.write_bytes(os.urandom(arguments.megabytes * 1_000_000))
            rows = [
                (
                    "proxy (PTY shell)",
                    measure(ProxyRemote, proxy, root, source, arguments.round_trips),
                ),
                (
                    "direct (exec+SFTP)",
                    measure(DirectRemote, plain, root, source, arguments.round_trips),
                ),
            ]
        finally:
            plain.stop()
            proxy.stop()
    print(
        f"{arguments.round_trips} round trips of `true`; {arguments.megabytes} MB random file, "
        f"sha256-verified; loopback, {os.cpu_count()} CPUs"
    )
    header = (
        f"{'path':<20}{'first cmd':>11}{'rt median':>11}{'rt p90':>9}{'upload':>12}{'download':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, row in rows:
        print(
            f"{name:<20}{row['first'] * 1000:>9.0f}ms{row['median'] * 1000:>9.1f}ms"
            f"{row['p90'] * 1000:>7.1f}ms{row['upload']:>8.1f} MB/s{row['download']:>7.1f} MB/s"
        )


if __name__ == "__main__":
    main()
