"""Run a RunPod emulator by hand, to try hctl without a RunPod account or money.

    python scripts/runpod_emulator.py [--api rest|graphql] --port 8765 [--ready-after-polls 3]

`--api rest` (the default) is RunPod's REST API v2, which hctl's default provider speaks;
`--api graphql` is RunPod's GraphQL API (provider runpod-graphql, for spot pods). It prints the
URL, a test API key and the lines that point hctl at it.

Faults, to see what hctl does when RunPod misbehaves (each `--fault` may be given again):

    --fault KIND[:OPERATION[:TIMES[:STATUS]]]   e.g. --fault server_error:stop:5:503
    --out-of-stock GPU_ID                       e.g. --out-of-stock "NVIDIA GeForce RTX 4090"

KIND is one of the emulated RunPod's faults (`unauthorized`, `rate_limited`, `server_error`,
`capacity`, `drop_after_apply`, `slow`, ...: see `FaultKind` in tests/standins/runpod_cloud.py);
OPERATION one of create, list, get, start, stop, terminate, gpus, keys, billing, or `any`
(the default); TIMES how many requests fail (1); STATUS the HTTP status of a server error (500).
The servers live in
`tests/standins/` (`runpod_rest_emulator.py`, `runpod_emulator.py`); the tests start them
in-process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import get_args

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.standins.runpod_cloud import FaultKind  # noqa: E402
from tests.standins.runpod_emulator import RunPodEmulator  # noqa: E402
from tests.standins.runpod_rest_emulator import RunPodRestEmulator  # noqa: E402

APIS = {"rest": RunPodRestEmulator, "graphql": RunPodEmulator}
FAULT_KINDS = get_args(FaultKind)


def parse_fault(spec: str) -> dict:
    """`KIND[:OPERATION[:TIMES[:STATUS]]]` as `inject_fault`'s arguments; ValueError if wrong."""
    parts = spec.split(":")
    if len(parts) > 4 or parts[0] not in FAULT_KINDS:
        raise ValueError(
            f"{spec!r}: give KIND[:OPERATION[:TIMES[:STATUS]]], KIND one of {', '.join(FAULT_KINDS)}"
        )
    kind, operation, times, status = [*parts, "", "", ""][:4]
    try:
        return {
            "kind": kind,
            "operation": None if operation in ("", "any") else operation,
            "times": int(times or 1),
            "status": int(status or 500),
        }
    except ValueError:
        raise ValueError(f"{spec!r}: TIMES and STATUS are whole numbers") from None


def main() -> None:
    parser = argparse.ArgumentParser(
        description="A local stand-in for RunPod's API.",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--api", choices=sorted(APIS), default="rest", help="REST v2 (default) or GraphQL."
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    parser.add_argument("--port", type=int, default=8765, help="Port to listen on (0: any free).")
    parser.add_argument(
        "--ready-after-polls",
        type=int,
        default=2,
        help="How many reads of a new or resumed pod show it still starting (runtime null).",
    )
    parser.add_argument("--pub-key", default="", help="The account's SSH public keys at start.")
    parser.add_argument(
        "--ssh-direct",
        metavar="HOST:PORT",
        help="Report this address as every pod's public SSH port (e.g. a local sshd).",
    )
    parser.add_argument(
        "--pod-host-id", help="Report this as every pod's SSH proxy user (machine.podHostId)."
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND[:OPERATION[:TIMES[:STATUS]]]",
        help="Make requests fail (see below); may be given again.",
    )
    parser.add_argument(
        "--out-of-stock",
        action="append",
        default=[],
        metavar="GPU_ID",
        help="No stock of this GPU.",
    )
    arguments = parser.parse_args()
    try:
        faults = [parse_fault(spec) for spec in arguments.fault]
    except ValueError as error:
        parser.error(str(error))
    emulator = APIS[arguments.api](
        host=arguments.host,
        port=arguments.port,
        ready_after_polls=arguments.ready_after_polls,
        pub_key=arguments.pub_key,
    )
    if arguments.ssh_direct or arguments.pod_host_id:
        direct = None
        if arguments.ssh_direct:
            host, _, port = arguments.ssh_direct.rpartition(":")
            direct = (host, int(port))
        emulator.route_ssh(direct=direct, pod_host_id=arguments.pod_host_id)
    for fault in faults:
        emulator.inject_fault(fault.pop("kind"), **fault)
    for gpu_id in arguments.out_of_stock:
        if emulator.gpu(gpu_id) is None:
            parser.error(f"no GPU {gpu_id!r} in the emulated catalogue (hctl gpus lists them)")
        emulator.set_stock(gpu_id, None)
    with emulator:
        print(f"RunPod emulator ({arguments.api}) listening on {emulator.url}")
        print(f"Test API key: {emulator.api_key}")
        print("Point hctl at it (bash):")
        for name, value in emulator.env().items():
            if name in ("HCTL_PROVIDER", "HCTL_RUNPOD_REST_URL", "HCTL_RUNPOD_API_URL"):
                print(f"  export {name}={value}")
        print(f"  export RUNPOD_API_KEY={emulator.api_key}")
        print("Then try: hctl gpus · hctl create-pod --yes · hctl list-pods. Ctrl-C stops it.")
        sys.stdout.flush()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("\nstopped")


if __name__ == "__main__":
    main()
