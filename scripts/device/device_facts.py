"""The machine a GPU benchmark ran on, and its measured copy bandwidth (the memory ceiling).

    python3 scripts/device/device_facts.py --device cuda --json OUT/device.json

Prints the GPUs (`nvidia-smi -L`), the torch / transformers / CUDA versions, and one copy
bandwidth: a device-to-device copy of --megabytes (random bytes, several times any cache),
counting bytes read plus bytes written, over the median of --repeats copies after three warm-ups,
timed with CUDA events on a GPU and the host clock on a CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch


def gpu_list() -> str:
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi"
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return (listed.stdout or listed.stderr).strip()


def copy_bandwidth(device: str, megabytes: int, repeats: int) -> dict:
    """Bytes read plus written per second by one large copy on `device` (median of repeats)."""
    size = megabytes * 2**20
    source = torch.randint(0, 256, (size,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    seconds = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000)
        else:
            started = time.perf_counter()
            target.copy_(source)
            seconds.append(time.perf_counter() - started)
    if not torch.equal(source[:: 2**16], target[:: 2**16]):
        raise SystemExit("error: the copy did not copy")
    median = statistics.median(seconds)
    return {"bytes_copied": size, "seconds": median, "bytes_per_s": 2 * size / median}


def facts(device: str, megabytes: int, repeats: int) -> dict:
    import transformers

    found = {
        "gpus": gpu_list(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
    }
    found["copy"] = copy_bandwidth(device, megabytes, repeats)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--megabytes", type=int, default=4096, help="size of the copied buffer")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default="", help="write the facts here")
    arguments = parser.parse_args(argv)
    if arguments.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: torch sees no CUDA device", file=sys.stderr)
        return 1
    found = facts(arguments.device, arguments.megabytes, arguments.repeats)
    print(found["gpus"])
    print(
        f"python {found['python']}, torch {found['torch']} (CUDA {found['torch_cuda']}), "
        f"transformers {found['transformers']}, device {found['device_name']}"
    )
    copy = found["copy"]
    print(
        f"copy bandwidth: {copy['bytes_per_s'] / 1e12:.3f} TB/s (read + written; "
        f"{copy['bytes_copied'] / 1e9:.2f} GB copied in {copy['seconds'] * 1e3:.3f} ms, median)"
    )
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(found, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
