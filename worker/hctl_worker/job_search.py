"""A job's search: where it looks, its first trials, and the trial loop with its reports.

The search space follows the settings (the whole depth, or heretic's ranges); the canonical and
measured startup trials are queued once per study, whichever worker gets there first; then this
worker takes part in the trial loop (`study.run_search`) until the study has `n_trials` finished
trials, reporting every trial numbered in its turn (its event, the front, results/pareto.json).
A trial whose refusals already put it behind the front stops early (`pruning.py`), and
`trials_together` trials are drawn and evaluated at once, sharing their decode steps
(`together.py`).
"""

from __future__ import annotations

import optuna

from hctl_worker import study as studies
from hctl_worker.architecture import COMPONENTS
from hctl_worker.events import ParetoEvent, TrialEvent, read_events
from hctl_worker.job_directory import JobPaths, write_results
from hctl_worker.pruning import PruningBar
from hctl_worker.reporter import Reporter
from hctl_worker.search_space import SearchSpace, to_ablation_params
from hctl_worker.settings import WorkerSettings
from hctl_worker.startup import describe_plan, enqueue_once, plan_startup, superseded
from hctl_worker.teamwork import Teamwork, forget_reports, mark_reported, reported_numbers
from hctl_worker.together import score_together
from hctl_worker.trials import Trial, pareto_front
from hctl_worker.workbench import Workbench


def search_space(settings: WorkerSettings, n_layers: int) -> SearchSpace:
    scopes = (
        ("global", "per_layer")
        if settings.direction_scope == "search"
        else (settings.direction_scope,)
    )
    if settings.search_ranges == "heretic":
        return SearchSpace.heretic(n_layers, COMPONENTS, scopes)
    return SearchSpace.whole(n_layers, COMPONENTS, scopes)


def _queue_first_trials(
    settings: WorkerSettings, reporter: Reporter, study: optuna.Study, bench: Workbench
) -> None:
    """The canonical trials and the measured startup points, queued once per study; heretic's
    ranges run exactly as heretic does (uniform startup trials, no canonical ones)."""
    if settings.search_ranges == "heretic":
        return
    assert settings.seed is not None
    space = search_space(settings, bench.profile.n_layers)
    plan = plan_startup(
        space, bench.profile, n_startup_trials=settings.n_startup_trials, seed=settings.seed
    )
    queued = enqueue_once(study, plan)
    reporter.log(describe_plan(plan) + ("" if queued else " (queued before)"))


def run_search(
    settings: WorkerSettings,
    paths: JobPaths,
    reporter: Reporter,
    study: optuna.Study,
    bench: Workbench | None,
    team: Teamwork,
) -> list[Trial]:
    """Take part in the search until it has `n_trials` finished trials (this worker's and the
    others'); every trial numbered in this worker's turn is reported here: its event, the front,
    results/pareto.json. Returns every finished trial."""
    space = search_space(settings, bench.profile.n_layers) if bench is not None else None
    if space is not None and bench is not None:
        reporter.log(f"search space ({settings.search_ranges}): {space.describe()}")
        with studies.study_storage(study).exclusive():  # once per study, whichever worker
            _queue_first_trials(settings, reporter, study, bench)

    def evaluate_together(points: list[dict[str, float | str]]) -> list[studies.Outcome]:
        assert bench is not None
        limit, front = None, None
        if settings.prune_trials:  # stop measuring what cannot matter: see `pruning.py`
            finished = studies.finished_trials(study)
            front = pareto_front(finished)
            if bench.scoring.can_prune:
                harmful = len(bench.evaluator.prompts["harmful"].texts)
                bar = PruningBar.for_prompts(finished, harmful, settings.prune_margin)
                limit = bar.refusal_limit
        trials = [to_ablation_params(values, COMPONENTS) for values in points]
        scored = score_together(bench, trials, refusal_limit=limit, front=front)
        return [studies.Outcome(scores=scores, pruned=pruned) for scores, pruned in scored]

    ran: list[Trial] = []
    with reporter.stage("search", f"{settings.n_trials} trials") as stage:

        def report(result: Trial, finished: list[Trial]) -> None:
            front = pareto_front(finished)
            reporter.emit(TrialEvent.of(result, settings.n_trials))
            reporter.emit(ParetoEvent(trials=front))
            stage.progress(len(finished), settings.n_trials)
            write_results(paths, front)

        finished = studies.run_search(
            study,
            space,  # type: ignore[arg-type]  # never sampled once the search has all its trials
            lambda values: evaluate_together([values])[0],
            n_trials=settings.n_trials,
            on_trial=ran.append,
            report=report,
            describe=lambda values: to_ablation_params(values, COMPONENTS).to_dict(),
            team=team,
            skip=superseded,
            evaluate_together=evaluate_together,
            at_once=settings.trials_together,
        )
        front = pareto_front(finished)
        write_results(paths, front)
        if not ran:  # no trial of this run's own, so maybe no pareto event from it yet
            reporter.emit(ParetoEvent(trials=front))
        stage.result = (
            f"{len(finished)} trials ({len(ran)} run by worker {team.name}), "
            f"{len(front)} on the Pareto front"
        )
    return finished


def match_reports_to_events(paths: JobPaths, study: optuna.Study) -> None:
    """Make the study's marks of reported trials agree with the job's events file.

    On a journal, every worker of the job writes the same events file, which is the record of
    what was reported: a job directory restored from copies (a resume on a new machine), or a
    job from before the marks, may hold trials the marks miss or marks the file lacks. Trials
    whose events are missing are then reported in the next turn, once.
    """
    with studies.study_storage(study).exclusive():
        shown = {
            event.number for event in read_events(paths.events)[0] if isinstance(event, TrialEvent)
        }
        finished = {trial.number for trial in studies.finished_trials(study)}
        marked = reported_numbers(study)
        forget_reports(study, marked - shown)
        mark_reported(study, (shown & finished) - marked)


__all__ = ["match_reports_to_events", "run_search", "search_space"]
