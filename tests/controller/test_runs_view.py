"""Progress from events, the headless trial choice, the live view's lines, the Pareto picture."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree

from rich.console import Console

from hctl.services.pareto_plot import render_svg
from hctl.services.progress import JobProgress
from hctl.services.view import LiveView, Money, live_panel
from hctl_worker.events import DoneEvent, StartEvent, TrialEvent
from hctl_worker.trials import Trial, choose, pareto_front


def trial(number: int, refusals: int | None, kl: float, seconds: float = 2.0) -> TrialEvent:
    return TrialEvent(
        number=number, n_trials=5, params={"direction_index": 1.5, "scope": "global"}, kl=kl,
        refusals=refusals, total_bad=20, refusal_skipped=refusals is None, seconds=seconds,
    )  # fmt: skip


TRIALS = [trial(1, 18, 0.01), trial(2, 5, 0.30), trial(3, 9, 0.05), trial(4, None, 2.0),
          trial(5, 2, 0.9)]  # fmt: skip


def test_progress_follows_the_events_and_estimates_what_is_left() -> None:
    progress = JobProgress()
    progress.apply(StartEvent(job_id="j", model="m", n_trials=5, worker_version="0"))
    for event in TRIALS[:3]:
        progress.apply(event)
    assert progress.trials_done == 3 and progress.latest.number == 3
    assert progress.best().number == 2  # the fewest refusals under the KL limit
    assert progress.best(kl_limit=0.1).number == 3
    assert progress.remaining_seconds(fallback_per_trial=99) == 2 * 2.0
    progress.apply(DoneEvent(results_dir="r"))
    assert progress.finished and progress.remaining_seconds(fallback_per_trial=1) == 0


def test_the_front_keeps_only_undominated_trials_and_the_choice_respects_the_kl_limit() -> None:
    front = pareto_front(TRIALS)
    assert [item.number for item in front] == [5, 2, 3, 1]  # trial 4 was not scored
    assert choose(front, kl_limit=0.5).number == 2
    assert choose(front, kl_limit=0.02).number == 1
    # Nothing under the limit: the least damaging (lowest KL) trial.
    assert choose(front, kl_limit=0.001).number == 1
    assert choose([], kl_limit=1) is None


def test_the_view_prints_one_line_per_trial_with_the_best_so_far_and_money() -> None:
    console = Console(file=__import__("io").StringIO(), width=200)
    progress = JobProgress(n_trials=5)
    money = Money(price_per_hour=0.31, spent=0.05, projected=0.12, max_cost=1.0, eta_seconds=75)
    with LiveView(console, job_id="j", machine="pod p") as view:
        for event in TRIALS:
            progress.apply(event)
            view.event(event, progress, money)
    assert len(view.lines) == 5
    assert view.lines[1].startswith("trial 2/5: KeywordRate 5/20, KLDivergence 0.3000")
    assert "best #2" in view.lines[2] and "ETA 1m15s" in view.lines[2] and "$0.05" in view.lines[2]
    assert "refusals skipped" in view.lines[3]
    panel = Console(file=__import__("io").StringIO(), width=120)
    panel.print(live_panel(progress, money, job_id="j", machine="pod p"))
    text = panel.file.getvalue()
    assert "trial 5/5" in text and "projected $0.12" in text and "$1.00 cap" in text


def test_the_pareto_picture_is_a_self_contained_svg() -> None:
    front = [Trial(number=t.number, kl=t.kl, refusals=t.refusals, total_bad=20)
             for t in TRIALS if t.refusals is not None]  # fmt: skip
    svg = render_svg(TRIALS, front, title="model <test> & co", chosen=2)
    root = ElementTree.fromstring(svg)
    circles = root.findall("{http://www.w3.org/2000/svg}circle")
    assert len(circles) == 4 + 4 + 1  # every scored trial, the front, the chosen ring
    assert "log scale" not in svg  # KL spans 0.01 to 0.9: less than two decades
    wide = render_svg([trial(1, 3, 0.0001), trial(2, 1, 0.5)], [], title="t")
    assert "log scale" in wide
    assert "model &lt;test&gt; &amp; co" in svg and "http" not in svg.replace(
        "http://www.w3.org/2000/svg", ""
    )


def test_a_pruned_trial_shows_its_count_so_far_and_is_never_the_best_nor_on_the_front() -> None:
    console = Console(file=__import__("io").StringIO(), width=200)
    progress = JobProgress(n_trials=5)
    # Behind trial 3 (9 refusals at KL 0.05) once it had shown 10 refusals at a higher KL.
    pruned = trial(6, 10, 0.06).model_copy(update={"pruned": True})
    with LiveView(console, job_id="j", machine="pod p") as view:
        for event in [*TRIALS[:3], pruned]:
            progress.apply(event)
            view.event(event, progress, None)
    line = view.lines[-1]
    assert line.startswith("trial 6/5: KeywordRate 10/20, ")
    assert "(pruned at 10/20 refusals: behind the front)" in line
    assert progress.best(kl_limit=0.1).number == 3
    assert 6 not in [item.number for item in pareto_front([*TRIALS, pruned])]
