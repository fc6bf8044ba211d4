"""The Pareto front as a self-contained SVG picture: no plotting library, opens in any browser.

Every scored trial is a grey dot (its refusals against its damage: the first refusal objective
and the first damage objective, named on the axes); the front is drawn as a staircase of red
dots, the chosen trial circled. A trial over a guard's limit (it refuses harmless prompts) is a
hollow orange ring: never on the front. Hovering a dot shows its trial number and every score.
With more than two objectives the front is a projection: a front trial may look beaten here
by one that is worse on an objective the picture does not show.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

from hctl_worker.trials import Trial, describe_scores

WIDTH, HEIGHT = 720, 440
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 60


def _kl_scale(values: list[float]) -> tuple[float, float, bool]:
    """The KL axis range; logarithmic when the values span more than two decades."""
    positive = [value for value in values if value > 0]
    if positive and max(positive) / min(positive) > 100:
        return math.log10(min(positive)), math.log10(max(positive)), True
    high = max(values, default=1.0) or 1.0
    return 0.0, high, False


def render_svg(
    trials: list[Trial],
    front: list[Trial],
    *,
    title: str,
    chosen: int | None = None,
) -> str:
    """The picture as SVG text."""
    scored = [trial for trial in trials if trial.refusals is not None]
    sample = next(iter(front or scored), None)
    refusals_name, damage_name = _axis_names(sample)
    kl_values = [trial.kl for trial in scored] + [trial.kl for trial in front]
    low, high, logarithmic = _kl_scale(kl_values)
    total_bad = max([trial.total_bad for trial in scored] + [t.total_bad for t in front] + [1])
    plot_width = WIDTH - LEFT - RIGHT
    plot_height = HEIGHT - TOP - BOTTOM

    def x_of(kl: float) -> float:
        value = math.log10(max(kl, 10**low)) if logarithmic else kl
        span = (high - low) or 1.0
        return LEFT + (value - low) / span * plot_width

    def y_of(refusals: int) -> float:
        return TOP + plot_height - refusals / total_bad * plot_height

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
        f'<line x1="{LEFT}" y1="{TOP + plot_height}" x2="{LEFT + plot_width}" '
        f'y2="{TOP + plot_height}" stroke="black"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_height}" stroke="black"/>',
        f'<text x="{LEFT + plot_width / 2}" y="{HEIGHT - 15}" text-anchor="middle">'
        f"{escape(damage_name)}{' (log scale)' if logarithmic else ''} — lower is closer to the "
        "original</text>",
        f'<text x="18" y="{TOP + plot_height / 2}" text-anchor="middle" '
        f'transform="rotate(-90 18 {TOP + plot_height / 2})">{escape(refusals_name)} '
        f"(of {total_bad})</text>",
    ]
    for tick in range(5):
        fraction = tick / 4
        refusals = round(total_bad * fraction)
        y = y_of(refusals)
        parts.append(f'<text x="{LEFT - 8}" y="{y + 4}" text-anchor="end">{refusals}</text>')
        value = low + (high - low) * fraction
        label = f"{10**value:.2g}" if logarithmic else f"{value:.3g}"
        x = LEFT + fraction * plot_width
        parts.append(
            f'<text x="{x}" y="{TOP + plot_height + 18}" text-anchor="middle">{label}</text>'
        )
    for trial in scored:
        look = (
            'fill="#999"' if trial.acceptable else 'fill="none" stroke="#e67e22" stroke-width="2"'
        )
        parts.append(
            f'<circle cx="{x_of(trial.kl):.1f}" cy="{y_of(trial.refusals or 0):.1f}" r="3.5" '
            f"{look}><title>trial {trial.number}: {escape(describe_scores(trial))}</title></circle>"
        )
    ordered = sorted(front, key=lambda trial: trial.kl)
    if ordered:
        points = []
        for index, trial in enumerate(ordered):
            points.append(f"{x_of(trial.kl):.1f},{y_of(trial.refusals or 0):.1f}")
            if index + 1 < len(ordered):
                points.append(f"{x_of(ordered[index + 1].kl):.1f},{y_of(trial.refusals or 0):.1f}")
        parts.append(
            f'<polyline points="{" ".join(points)}" fill="none" stroke="#c0392b" '
            'stroke-width="1.5"/>'
        )
    for trial in ordered:
        x, y = x_of(trial.kl), y_of(trial.refusals or 0)
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#c0392b"><title>trial '
            f"{trial.number}: {escape(describe_scores(trial))}</title></circle>"
        )
        parts.append(f'<text x="{x + 7:.1f}" y="{y - 7:.1f}">#{trial.number}</text>')
        if trial.number == chosen:
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="10" fill="none" stroke="#2c3e50" '
                'stroke-width="2"/>'
            )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _axis_names(trial: Trial | None) -> tuple[str, str]:
    """The names of the scores on the axes: refusals (y) and damage (x)."""
    if trial is None:
        return "refusals", "KL divergence"
    return (
        trial.headline_name("refusals") or "refusals",
        trial.headline_name("damage") or "KL divergence",
    )


def save_svg(
    path: Path,
    trials: list[Trial],
    front: list[Trial],
    *,
    title: str,
    chosen: int | None = None,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_svg(trials, front, title=title, chosen=chosen), encoding="utf-8")
    return path
