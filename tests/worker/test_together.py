"""Trials evaluated together (`together.py`): every trial's scores are its own, as if it ran
alone, while the trials share their harmful replies' decode steps."""

from __future__ import annotations

import random

import pytest
import torch

from hctl_worker.ablation import AblationParams, Ablator, ComponentKernel
from hctl_worker.directions import last_token_residuals, refusal_directions
from hctl_worker.edit_hooks import Lanes, LinearEdit, RowsNotShared, lanes_hook
from hctl_worker.encoding import encode_texts
from hctl_worker.generation import GenerationStats
from hctl_worker.markers import DEFAULT_REFUSAL_MARKERS
from hctl_worker.model import load_model
from hctl_worker.reuse import ReuseOptions
from hctl_worker.together import score_together
from hctl_worker.workbench import Workbench
from tests.worker.random_models import random_loaded
from tests.worker.scoring import evaluator_for, scoring_for
from tests.worker.test_refill import PROMPTS
from tests.worker.test_reuse import FIXTURES, SYSTEM, _prompts, _random_params


def _edit(peak: float, position: float, index: float | None = 1.0) -> AblationParams:
    kernel = ComponentKernel(peak, position, 0.4 * peak, 1.5)
    return AblationParams(index, {"attention": kernel, "mlp": kernel})


@pytest.mark.parametrize("row_normalization", ["none", "pre", "full"])
def test_each_row_gets_its_own_trials_edit(row_normalization: str) -> None:
    """Two trials applied together, the rows of one batch split between them, give each row the
    logits its trial gives it alone; one lane for the whole pass is exactly that trial."""
    loaded = random_loaded("llama", seed=3)
    texts = loaded.template(PROMPTS[:4], SYSTEM)
    residuals = last_token_residuals(loaded, texts, 4)
    ablator = Ablator(
        loaded,
        refusal_directions(residuals[:2], residuals[2:]),
        row_normalization=row_normalization,
    )
    (batch,) = encode_texts(loaded, texts, 4)
    trials = [_edit(1.3, 0.0), _edit(0.8, 1.0, None)]

    def logits(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return loaded.model(input_ids=input_ids, attention_mask=mask).logits[:, -1].float()

    alone = []
    for params in trials:
        with ablator.applied(params):
            alone.append(logits(batch.input_ids, batch.attention_mask))
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)  # the trials differ
    ablator.apply_together(trials)
    try:
        ablator.select(1)
        assert torch.equal(logits(batch.input_ids, batch.attention_mask), alone[1])
        rows = len(texts)
        ablator.select([0] * rows + [1] * rows)
        both = logits(batch.input_ids.repeat(2, 1), batch.attention_mask.repeat(2, 1))
        ablator.select([1, 0] * rows)
        mixed = logits(
            batch.input_ids.repeat_interleave(2, 0), batch.attention_mask.repeat_interleave(2, 0)
        )
    finally:
        ablator.restore()
    torch.testing.assert_close(both, torch.cat(alone), rtol=1e-4, atol=1e-4)
    expected = torch.stack([alone[1 - row % 2][row // 2] for row in range(2 * rows)])
    torch.testing.assert_close(mixed, expected, rtol=1e-4, atol=1e-4)
    assert ablator.unchanged_layers() == ablator.n_layers  # restored: no trial is on


def _bench(name: str, count: int, drafts: bool = False, **scoring_settings) -> Workbench:
    fixture = FIXTURES / name
    loaded = load_model(str(fixture), dtypes=["float32"], device_map="cpu")
    good = loaded.template(_prompts(fixture, "harmless_test", count), SYSTEM)
    bad = loaded.template(_prompts(fixture, "harmful_test", count), SYSTEM)
    ablator = Ablator(
        loaded,
        refusal_directions(
            last_token_residuals(loaded, bad, 8), last_token_residuals(loaded, good, 8)
        ),
    )
    scoring = scoring_for(DEFAULT_REFUSAL_MARKERS, **scoring_settings)
    evaluator = evaluator_for(
        loaded,
        scoring,
        good=good,
        bad=bad,
        max_response_length=12,
        batch_size=8,
        unchanged_layers=ablator.unchanged_layers,
        reuse=ReuseOptions(drafts=drafts),
    )
    scoring.set_baseline(scoring.score(evaluator.evaluate()))
    return Workbench(
        loaded=loaded,
        evaluator=evaluator,
        scoring=scoring,
        baseline={},
        ablator=ablator,
        profile=None,  # type: ignore[arg-type]  # the search's priors: not used here
    )


def _values(scored):
    return [
        ({name: score.value for name, score in scores.items()}, pruned) for scores, pruned in scored
    ]


@pytest.mark.parametrize(("count", "drafts"), [(2, False), (4, False), (4, True)])
def test_trials_scored_together_score_as_each_alone_in_fewer_passes(
    count: int, drafts: bool
) -> None:
    """On the refuser, with the default scorers (refusals, KL, the harmless guard): every trial's
    scores together are its scores alone (KL to float rounding), and together the trials'
    replies take fewer forward passes (than alone without drafts; with drafts on, alone may
    draft, and together the shared replies do not)."""
    bench = _bench("tiny-refuser", 16, drafts=drafts)
    generator = random.Random(count)
    groups = [
        [_random_params(generator, bench.ablator.n_layers) for _ in range(count)] for _ in range(3)
    ]
    passes = {"alone": 0, "together": 0}
    for trials in groups:
        before = bench.evaluator.stats.forward_passes
        alone = [score_together(bench, [params])[0] for params in trials]
        passes["alone"] += bench.evaluator.stats.forward_passes - before
        before = bench.evaluator.stats.forward_passes
        together = score_together(bench, trials)
        passes["together"] += bench.evaluator.stats.forward_passes - before
        for (one, pruned_one), (joint, pruned_joint) in zip(
            _values(alone), _values(together), strict=True
        ):
            assert pruned_one == pruned_joint
            assert one.keys() == joint.keys()
            for name, value in one.items():
                if name == "KLDivergence":
                    assert joint[name] == pytest.approx(value, rel=1e-4, abs=1e-6)
                else:
                    assert joint[name] == value, name
    if not drafts:
        assert passes["together"] < passes["alone"]


def test_a_trial_that_reaches_its_refusal_limit_stops_alone() -> None:
    """With a refusal limit, the trial that still refuses is pruned at the limit (its count the
    lower bound it stopped at, as alone: rows decided in the same step all count), while the
    trial that complies runs to the end and is measured in full (its guard too)."""
    bench = _bench("tiny-refuser", 16)
    n_layers = bench.ablator.n_layers

    def everywhere(peak: float) -> AblationParams:
        kernel = ComponentKernel(peak, n_layers / 2, peak, n_layers)
        return AblationParams(None, {"attention": kernel, "mlp": kernel})

    refusing, complying = everywhere(0.5), everywhere(1.0)
    alone = _values([score_together(bench, [p])[0] for p in (refusing, complying)])
    assert [values["KeywordRate"] for values, _ in alone] == [16, 0]
    limit = 2

    def refusal_limit(damage: float) -> int:
        return limit

    expected = [score_together(bench, [p], refusal_limit)[0] for p in (refusing, complying)]
    together = score_together(bench, [refusing, complying], refusal_limit)
    assert [pruned for _, pruned in together] == [True, False]
    assert _values(together)[0][0]["KeywordRate"] >= limit  # the count that stopped it
    for (one, _), (joint, _) in zip(_values(expected), _values(together), strict=True):
        assert one["KeywordRate"] == joint["KeywordRate"]
        assert joint["KLDivergence"] == pytest.approx(one["KLDivergence"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    "architecture", ["gpt2", "gpt_neox", "opt", "falcon", "phi3", "qwen3_moe", "gemma2"]
)
def test_every_family_replies_together_as_alone(architecture: str) -> None:
    """Across families (fused experts are applied alone; sliding-window caches cannot be joined,
    so their lanes' batches run one after the other), the replies together are word for word
    those of each trial alone."""
    loaded = random_loaded(architecture, seed=5)
    texts = loaded.template(PROMPTS, SYSTEM)
    residuals = last_token_residuals(loaded, texts, 4)
    ablator = Ablator(loaded, refusal_directions(residuals[:5], residuals[5:]))
    scoring = scoring_for(["zz"])
    evaluator = evaluator_for(
        loaded,
        scoring,
        good=texts,
        bad=texts,
        max_response_length=8,
        batch_size=4,
        unchanged_layers=ablator.unchanged_layers,
        reuse=ReuseOptions(drafts=False),
    )
    trials = [_edit(1.2, 0.0), _edit(0.9, 1.0, None)]
    alone = []
    for params in trials:
        with ablator.applied(params):
            evaluator.evaluate()
            alone.append(evaluator.replies("harmful"))
    if not ablator.can_apply_together(trials):
        assert architecture == "qwen3_moe"  # its experts are edited in place
        return
    ablator.apply_together(trials)
    try:
        lanes = []
        for index in range(len(trials)):
            ablator.select(index)
            evaluator.edit_changed()
            lanes.append(evaluator.lane("harmful"))
        evaluator.stats = GenerationStats()
        together = evaluator.replies_together("harmful", lanes, ablator.select)
    finally:
        ablator.restore()
    assert together == alone


def test_a_model_whose_rows_cannot_carry_different_edits_runs_its_trials_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A projection whose output does not keep the batch's rows first cannot tell the lanes'
    rows apart: the hook says so, and the trials are scored alone, then and from then on."""
    edit = LinearEdit(direction=torch.ones(3), scaled=torch.ones(3))
    lanes = Lanes(2)
    lanes.select([0, 1])
    hook = lanes_hook([edit, None], lanes)
    with pytest.raises(RowsNotShared):
        hook(torch.nn.Identity(), (torch.zeros(3, 3),), torch.zeros(3, 3))

    bench = _bench("tiny-refuser", 8)
    trials = [_edit(0.5, 2.0, None), _edit(1.0, 2.0, None)]
    alone = _values([score_together(bench, [params])[0] for params in trials])

    def unshared(*args, **kwargs):
        raise RowsNotShared("rows flattened")

    monkeypatch.setattr(bench.evaluator, "replies_together", unshared)
    assert _values(score_together(bench, trials)) == alone
    assert bench.ablator.shares_rows is False
    calls = []
    monkeypatch.setattr(bench.ablator, "apply_together", lambda *args: calls.append(args))
    assert _values(score_together(bench, trials)) == alone
    assert not calls  # no second try


def test_trials_that_skip_their_replies_leave_the_others_their_own_edits() -> None:
    """A trial whose KL is over `kl_skip_threshold` generates no replies, so the shared
    generation has fewer lanes than trials applied: each lane must still run its own trial's
    edit (the skipped trials first in the group, so lane and trial numbers differ)."""
    bench = _bench("tiny-refuser", 16, kl_skip_threshold=0.01)
    n_layers = bench.ablator.n_layers

    def everywhere(peak: float, index: float | None = None) -> AblationParams:
        kernel = ComponentKernel(peak, n_layers / 2, peak, n_layers)
        return AblationParams(index, {"attention": kernel, "mlp": kernel})

    skipped = [everywhere(2.0), everywhere(2.0, n_layers - 1.0)]  # KL 0.028, 0.027: over 0.01
    answered = [everywhere(0.5), everywhere(1.0, n_layers - 1.0)]  # 16/16 and 0/16 refusals
    alone = _values([score_together(bench, [params])[0] for params in skipped + answered])
    assert [values["KeywordRate"] for values, _ in alone] == [None, None, 16, 0]
    assert _values(score_together(bench, skipped + answered)) == alone
