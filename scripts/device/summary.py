"""The GPU benchmark's short table, printed last: the device, hctl vs heretic per trial, and the
worker's decode step against the bandwidth limit (from the JSON files in OUT).

    python3 scripts/device/summary.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _n(value, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def lines(out: Path) -> list[str]:
    device, decode, bench, graphs = (
        read(out / name)
        for name in ("device.json", "decode.json", "bench_heretic.json", "graphs.json")
    )
    shown = []
    copy = device.get("copy", {})
    shown.append(
        f"device: {device.get('device_name', '?')}, torch {device.get('torch', '?')}, "
        f"copy bandwidth {_n(copy.get('bytes_per_s'), 1e-12, 3)} TB/s (read + written)"
    )
    for name, entry in bench.get("models", {}).items():
        shown.append(f"model {name}: a random model never refuses; compare the time per trial")
        shown.append(f"  {'tool':<8} {'s/trial mean':>12} {'median':>8} {'trials':>7} {'run s':>8}")
        for tool in ("hctl", "heretic"):
            row = entry[tool]
            shown.append(
                f"  {tool:<8} {_n(row['trial_mean_s']):>12} {_n(row['trial_median_s']):>8} "
                f"{row['trials']:>7} {_n(row['end_to_end_s'], digits=1):>8}"
            )
        ratios = entry["ratios"]
        shown.append(
            f"  heretic / hctl: {_n(ratios['trial_mean'])} per trial (mean), "
            f"{_n(ratios['trial_median'])} (median), {_n(ratios['end_to_end'])} end to end"
        )
    if not bench:
        shown.append("hctl vs heretic: no bench_heretic.json (see bench_heretic.log)")
    if decode:
        shown.append(
            f"worker decode step, batch {decode['batch_size']}: "
            f"{_n(decode['decode_step_s'], 1e3)} ms; limit {_n(decode.get('weights_limit_s'), 1e3)} ms "
            f"for {_n(decode['weight_bytes_per_step'], 1e-9)} GB of weights "
            f"-> {_n(decode.get('fraction_of_limit_weights'), 100, 1)} % of the bandwidth limit "
            f"({_n(decode.get('fraction_of_limit_weights_and_cache'), 100, 1)} % counting "
            f"~{_n(decode['cache_bytes_per_step'], 1e-9)} GB of key/value cache)"
        )
    elif not graphs:
        shown.append("worker decode step: no decode.json (see the log)")
    if graphs:
        shown.extend(_graph_lines(graphs))
    return shown


def _graph_lines(graphs: dict) -> list[str]:
    """graph_check.py's verdict on the replies and its decode step each way."""
    replies = graphs.get("replies", {})
    verdict = "MISMATCH" if replies.get("mismatches") else "identical"
    shown = [
        f"decode graphs, batch {graphs.get('batch_size')}: replies {verdict} over "
        f"{len(replies.get('trials', []))} trials; limit {_n(graphs.get('weights_limit_s'), 1e3)} ms"
    ]
    for name, figures in graphs.get("timing", {}).items():
        shown.append(
            f"  {name:<7} {_n(figures['decode_step_s'], 1e3)} ms per step "
            f"({_n(figures.get('times_the_limit'), digits=1)}x the limit); "
            f"{graphs['decoders'].get(name, '')}"
        )
    return shown


def main(argv: list[str]) -> int:
    print("\n".join(lines(Path(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
