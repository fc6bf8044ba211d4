"""bench_worker.py's figures: each evaluation kind's trials summarised, and the printed table."""

from __future__ import annotations

import json
import os


def summarise(rows: list[dict]) -> dict:
    seconds = sorted(row["seconds"] for row in rows)

    def mean(key: str) -> float:
        return sum(row[key] for row in rows) / len(rows)

    parts = sorted({part for row in rows for part in row["parts_s"]})
    generating = sum(
        value for row in rows for part, value in row["parts_s"].items() if "replies" in part
    )
    return {
        "parts_s": {
            part: sum(r["parts_s"].get(part, 0.0) for r in rows) / len(rows) for part in parts
        },
        "generated_tokens_per_s": sum(r["generated_tokens"] for r in rows) / max(generating, 1e-9),
        "seconds_per_trial": sum(seconds) / len(seconds),
        "median_s": seconds[len(seconds) // 2],
        "min_s": seconds[0],
        "max_s": seconds[-1],
        "forward_passes": mean("forward_passes"),
        "layer_tokens": mean("layer_tokens"),
        "input_tokens": mean("input_tokens"),
        "generated_tokens": mean("generated_tokens"),
        "floor_tokens": None if rows[0]["floor_tokens"] is None else mean("floor_tokens"),
        "draft_acceptance": sum(r["accepted"] for r in rows)
        / max(1, sum(r["drafted"] for r in rows)),
        "pruned": sum(1 for row in rows if row["pruned"]),
        "mean_start_layer": mean("start_layer"),
        "refusals_min": min(
            (r["refusals"] for r in rows if r["refusals"] is not None), default=None
        ),
        "refusals_max": max(
            (r["refusals"] for r in rows if r["refusals"] is not None), default=None
        ),
    }


def floor_line(row: dict) -> str:
    """The least any exact evaluation of the same trials computes, priced at the fitted cost
    per token (no cost per pass): how far the trials are from it."""
    if row["floor_tokens"] is None:
        return "-"
    if row["pass_cost"] is None:
        return f"{row['floor_tokens']:.0f} all-layer tokens per trial"
    floor_s = row["floor_tokens"] * row["pass_cost"]["per_token_ms"] / 1000
    return (
        f"{row['floor_tokens']:.0f} all-layer tokens per trial (own prompt tokens above the "
        f"first edited layer + reply tokens) = {floor_s:.3f} s at the fitted cost per token; "
        f"trials took {row['seconds_per_trial'] / max(floor_s, 1e-9):.2f}x that"
    )


def print_table(results: dict) -> None:
    trials = results["trials"]
    rows = [
        ("model", results["settings"]["model"] or "tiny-refuser (fixture)"),
        ("parameters / layers", f"{results['parameters']:,} / {results['n_layers']}"),
        (
            "device / dtype / threads",
            f"{results['settings']['device']} / "
            f"{results['settings']['dtype']} / {results['threads']}",
        ),
        ("load", f"{results['stages']['load_s']:.2f} s"),
        (
            "residuals",
            f"{results['stages']['residuals_s']:.2f} s "
            f"({results['stages']['residual_prompts']} prompts)",
        ),
        ("baseline (references + scores)", f"{results['stages']['baseline_s']:.2f} s"),
        ("shared prompt prefix (tokens prefilled once)", str(results["shared_prefix_tokens"])),
        ("reuse", results["reuse"]),
        (
            "trials",
            f"{trials['count']} ({results['settings']['params']} parameters; "
            f"{trials['kl_prompts']} KL prompts, {trials['refusal_prompts']} refusal prompts)",
        ),
    ]
    for kind, baseline in results["baseline"].items():
        rows.append((f"{kind}: baseline", json.dumps(baseline)))
        row = trials[kind]
        rows += [
            (
                f"{kind}: seconds per trial mean / median",
                f"{row['seconds_per_trial']:.3f} / {row['median_s']:.3f} s "
                f"(min {row['min_s']:.3f}, max {row['max_s']:.3f})",
            ),
            (
                f"{kind}: per trial passes / layer-tokens / input tokens",
                f"{row['forward_passes']:.1f} / {row['layer_tokens']:.0f} / "
                f"{row['input_tokens']:.0f}",
            ),
            (
                f"{kind}: start layer (mean) / drafts kept / pruned",
                f"{row['mean_start_layer']:.1f} / {row['draft_acceptance']:.0%} / {row['pruned']}",
            ),
            (
                f"{kind}: per trial by stage",
                ", ".join(f"{part} {value:.3f} s" for part, value in row["parts_s"].items())
                + f"; {row['generated_tokens_per_s']:.0f} generated tokens/s",
            ),
            (f"{kind}: refusals across trials", f"{row['refusals_min']}..{row['refusals_max']}"),
            (f"{kind}: generations drafted / plain", json.dumps(row["draft_choices"])),
            (
                f"{kind}: measured pass cost",
                "-"
                if row["pass_cost"] is None
                else f"{row['pass_cost']['fixed_ms']:.1f} ms + "
                f"{row['pass_cost']['per_token_ms']:.3f} ms per token fed (all layers)",
            ),
            (f"{kind}: exact-work floor", floor_line(row)),
            (
                f"{kind}: KL passes alone",
                ", ".join(f"{part} {ms:.1f} ms" for part, ms in row["kl_passes_ms"].items()),
            ),
        ]
    for combination in results["settings"]["scorers"]:
        reuse, plain = trials[f"{combination} reuse"], trials.get(f"{combination} plain")
        if plain is None:
            continue
        rows += [
            (
                f"{combination}: plain / reuse: seconds, layer-tokens, passes",
                f"{plain['seconds_per_trial'] / reuse['seconds_per_trial']:.2f}x, "
                f"{plain['layer_tokens'] / max(reuse['layer_tokens'], 1):.2f}x, "
                f"{plain['forward_passes'] / max(reuse['forward_passes'], 1):.2f}x",
            ),
            (
                f"{combination}: trials whose scores differ (unpruned)",
                str(trials["mismatched_trials"][combination] or "none"),
            ),
        ]
    rows += [
        ("load average", " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("peak RSS", f"{results['peak_rss_mb']:.0f} MB"),
    ]
    if "bandwidth" in results:
        band = results["bandwidth"]
        rows.append(
            (
                "seconds per pass / bandwidth floor",
                f"{band['seconds_per_pass'] * 1000:.2f} / {band['floor_s_per_pass'] * 1000:.2f} ms "
                f"({band['fraction_of_limit']:.0%} of the limit)",
            )
        )
    if "peak_cuda_mb" in results:
        rows.append(("peak CUDA memory", f"{results['peak_cuda_mb']:.0f} MB"))
    if results.get("end_to_end"):
        for key, value in results["end_to_end"].items():
            rows.append((f"hctl-worker run: {key}", json.dumps(value)))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
