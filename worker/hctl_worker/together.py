"""Trials evaluated together: two or more trials share their harmful replies' decode steps.

A decode step reads every weight of the model to compute a token for each row; on a GPU that
read is nearly all of its cost, and on a CPU it and the step's other fixed work are a large part
(`PassCost`: about 67 ms of a 145 ms step of 32 rows on SmolLM2-135M, one thread). Trials
applied together (`Ablator.apply_together`) run, one after the other, what each measures alone:
its first-token KL, and its batches' first passes (from its own first edited layer, with its
own shared prefix). Then the decode steps carry every trial's rows, each row edited by its own
trial (`edit_hooks.Lanes`), so the trials share each step. Each trial keeps its own verdicts: a
trial whose refusals reach its limit stops alone. The rest of its scoring (the guards) runs for
each trial as `Workbench.score` does. The scores are those of each trial evaluated alone, up to
the rounding of batched matrix products.

A joint batch that runs out of memory is given up, and each trial's replies are made alone; so
are they when a projection's output does not keep a batch's rows first (`RowsNotShared`), and
for that model from then on.
Trials are evaluated alone when they cannot share: an edit that is not a hook on a projection
(fused experts edited in place), replies that decode on static buffers, or fewer than two
trials that generate harmful replies at all. Replies shared so do not draft (`draft_replies`):
the shared steps cut the passes instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hctl_worker.ablation import AblationParams
from hctl_worker.edit_hooks import RowsNotShared
from hctl_worker.errors import OutOfMemoryError
from hctl_worker.model_errors import free_memory
from hctl_worker.trials import Score, Trial
from hctl_worker.workbench import Workbench

Scored = tuple[dict[str, Score], bool]  # a trial's scores, and whether it was pruned


def score_together(
    bench: Workbench,
    trials: Sequence[AblationParams],
    refusal_limit: Callable[[float], int | None] | None = None,
    front: Sequence[Trial] | None = None,
) -> list[Scored]:
    """Each trial's scores and whether it was pruned (see `Workbench.score`), the trials sharing
    their harmful replies' decode steps where they can."""
    ablator = bench.ablator
    if len(trials) < 2 or not ablator.shares_rows or not ablator.can_apply_together(trials):
        return [_alone(bench, params, refusal_limit, front) for params in trials]
    evaluator, scoring = bench.evaluator, bench.scoring
    ablator.apply_together(trials)
    try:
        contexts, begun, lanes = [], [], []
        for index in range(len(trials)):
            ablator.select(index)
            context = evaluator.evaluate()
            opened = scoring.begin(context, refusal_limit)
            contexts.append(context)
            begun.append(opened)
            if "harmful_replies" in scoring.reads_next(opened):
                lanes.append((index, evaluator.lane("harmful", context.harmful_verdicts())))
        if len(lanes) > 1 and all(lane.shares_steps for _, lane in lanes):
            order = [index for index, _ in lanes]  # the generation's lanes are these trials

            def select(chosen: int | Sequence[int]) -> None:
                ablator.select(
                    order[chosen] if isinstance(chosen, int) else [order[c] for c in chosen]
                )

            try:
                made = evaluator.replies_together("harmful", [lane for _, lane in lanes], select)
            except OutOfMemoryError:  # the joint batch did not fit: each trial's alone, below
                free_memory()
            except RowsNotShared:  # a model whose rows cannot be told apart: never again
                ablator.shares_rows = False
            else:
                for (index, lane), replies in zip(lanes, made, strict=True):
                    contexts[index].keep_replies("harmful", replies, lane.verdicts)
        results: dict[int, Scored] = {}
        # The last trial's passes kept for its harmless replies are still its own: it goes first.
        for index in reversed(range(len(trials))):
            ablator.select(index)
            if index != len(trials) - 1:
                evaluator.edit_changed()
            context = contexts[index]
            results[index] = (scoring.finish(context, begun[index], front), context.pruned)
        return [results[index] for index in range(len(trials))]
    finally:
        ablator.restore()


def _alone(
    bench: Workbench,
    params: AblationParams,
    refusal_limit: Callable[[float], int | None] | None,
    front: Sequence[Trial] | None,
) -> Scored:
    with bench.ablator.applied(params):
        return bench.score(refusal_limit=refusal_limit, front=front)


__all__ = ["score_together"]
