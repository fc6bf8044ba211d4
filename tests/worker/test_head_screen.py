"""The output head's screen (`head_screen.py`): decode steps find the plain float32 head's greedy
token, also where bfloat16 cannot tell the leaders apart, and the whole evaluation of real
trials is unchanged with it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from hctl_worker.ablation import Ablator
from hctl_worker.cpu_linear import route
from hctl_worker.directions import last_token_residuals, refusal_directions
from hctl_worker.head_screen import ArgmaxHead, choosing
from hctl_worker.markers import DEFAULT_REFUSAL_MARKERS
from hctl_worker.model import load_model
from hctl_worker.reuse import ReuseOptions
from tests.realmodels import read_prompts
from tests.worker.scoring import evaluator_for, scoring_for
from tests.worker.test_reuse import SYSTEM, _random_params


class HeadOnly(torch.nn.Module):
    """A model that is its output head (what the screen needs of a model)."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.lm_head = head

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head


def _head(vocabulary: int, width: int, seed: int, **options) -> torch.nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(width, vocabulary, bias=False, **options)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocabulary, width, generator=generator))
    return head


def _screen(head: torch.nn.Linear) -> ArgmaxHead:
    screen = ArgmaxHead.build(HeadOnly(head))
    assert screen is not None
    return screen


def test_near_ties_go_to_the_plain_heads_token() -> None:
    """For each row a second token is made to trail or lead the top one by 1e-4, far below what
    bfloat16 resolves: the screen still picks the plain head's token, where bfloat16 alone picks
    the other one in many rows (so the float32 stage is what decides)."""
    generator = random.Random(5)
    vocabulary, width = 8040, 48  # not a whole number of blocks
    wrong_in_bfloat16 = 0
    for case in range(40):
        head = _head(vocabulary, width, case)
        hidden = torch.randn(1, width, generator=torch.Generator().manual_seed(100 + case))
        with torch.no_grad():
            top = int((hidden @ head.weight.T).argmax())
            other = generator.randrange(vocabulary)
            if other == top:
                continue
            step = generator.choice([-1e-4, 1e-4])
            head.weight[other] = head.weight[top] + step * hidden[0] / hidden[0].square().sum()
        screen = _screen(head)
        rows = hidden.repeat(3, 1)
        with torch.inference_mode():
            plain = screen.plain(rows).argmax(-1)
            chosen = screen.choose(rows).argmax(-1)
            bfloat16 = (rows.bfloat16() @ head.weight.detach().bfloat16().T).float().argmax(-1)
        assert torch.equal(chosen, plain), case
        assert screen.plain_rows == 0  # screened, not handed to the plain head
        wrong_in_bfloat16 += int((bfloat16 != plain).any())
    assert wrong_in_bfloat16 >= 5


@pytest.mark.parametrize("shape", [(1,), (7,), (5, 3)])
def test_greedy_tokens_match_for_any_rows_and_draft_columns(shape: tuple[int, ...]) -> None:
    """Hidden states [rows, width] and [rows, columns, width] (a pass with drafts) give the
    plain head's greedy tokens, in logits of the plain head's shape and dtype, float32 values
    at the chosen tokens."""
    head = _head(8000, 64, 1)
    screen = _screen(head)
    hidden = 3 * torch.randn(*shape, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        plain = screen.plain(hidden)
        chosen = screen.choose(hidden)
    assert chosen.shape == plain.shape and chosen.dtype == plain.dtype
    assert torch.equal(chosen.argmax(-1), plain.argmax(-1))
    picked = chosen.argmax(-1, keepdim=True)
    torch.testing.assert_close(chosen.gather(-1, picked), plain.gather(-1, picked))


def test_flat_logits_run_the_plain_head() -> None:
    """Rows whose logits are all alike leave every block a candidate: the step runs the plain
    head, and its logits are the plain ones."""
    head = _head(2048, 32, 3)
    with torch.no_grad():
        head.weight.mul_(1e-3).add_(1.0)  # every row nearly the same
    screen = _screen(head)
    hidden = torch.randn(4, 32, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        chosen = screen.choose(hidden)
    assert screen.plain_rows == 4 and screen.screened_rows == 0
    assert torch.equal(chosen, screen.plain(hidden))


def test_a_head_edited_after_the_screen_was_made_runs_plain() -> None:
    """The screen's bfloat16 copy is of the weights as they were: after an edit in place (or a
    new weight), every step runs the plain head, on the new weights."""
    head = _head(4096, 32, 8)
    screen = _screen(head)
    hidden = torch.randn(3, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        head.weight[:, 0] += 5.0
    with torch.inference_mode():
        assert torch.equal(screen.choose(hidden), screen.plain(hidden))
    assert screen.plain_rows == 3 and screen.screened_rows == 0


def test_heads_the_screen_does_not_take() -> None:
    assert ArgmaxHead.build(HeadOnly(torch.nn.Linear(16, 4096, bias=True))) is None
    assert ArgmaxHead.build(HeadOnly(_head(4096, 16, 0, dtype=torch.bfloat16))) is None
    assert ArgmaxHead.build(HeadOnly(_head(100, 16, 0))) is None  # too few tokens to block
    assert ArgmaxHead.build(HeadOnly(torch.nn.Identity())) is None
    # Probed where it cannot apply, nothing runs.
    assert ArgmaxHead.probed(HeadOnly(torch.nn.Identity()), lambda: pytest.fail("ran")) is None


def test_choosing_swaps_the_heads_forward_and_puts_it_back() -> None:
    """Inside `choosing`, calling the head gives the screen's logits (the floor away from the
    candidates); after, the head's own. A head with a forward hook of its own stays plain."""
    head = _head(1024, 16, 6)
    screen = _screen(head)
    hidden = torch.randn(2, 16, generator=torch.Generator().manual_seed(7))
    floor = torch.finfo(torch.float32).min
    with torch.inference_mode():
        with choosing(screen):
            inside = head(hidden)
        after = head(hidden)
        assert (inside == floor).any() and not (after == floor).any()
        assert torch.equal(inside.argmax(-1), after.argmax(-1))
        assert "forward" not in head.__dict__
        handle = head.register_forward_hook(lambda module, args, output: output)
        try:
            with choosing(screen):
                hooked = head(hidden)
        finally:
            handle.remove()
        assert torch.equal(hooked, after)
        with choosing(None):
            assert torch.equal(head(hidden), after)
    # A head computing through oneDNN (`cpu_linear`) gets that forward back, and the screen's
    # float32 stage computes as it does.
    route([head])
    routed = head.__dict__["forward"]
    screen = _screen(head)
    with torch.inference_mode(), choosing(screen):
        assert torch.equal(head(hidden).argmax(-1), after.argmax(-1))
    assert head.__dict__["forward"] is routed


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_real_trials_score_the_same_with_the_screen(smollm2_refuser: Path) -> None:
    """On the real refuser, five trials (and the baseline) give the same refusals, harmless
    refusals and replies with every decode step screened as with none (the screen is put in
    directly: whether a job keeps it depends on this machine's bfloat16 speed)."""
    torch.set_num_threads(2)
    loaded = load_model(str(smollm2_refuser), dtypes=["float32"], device_map="cpu")
    good = loaded.template(read_prompts(smollm2_refuser, "harmless_test")[:16], SYSTEM)
    bad = loaded.template(read_prompts(smollm2_refuser, "harmful_test")[:16], SYSTEM)
    ablator = Ablator(
        loaded,
        refusal_directions(
            last_token_residuals(loaded, bad, 8), last_token_residuals(loaded, good, 8)
        ),
    )
    generator = random.Random(11)
    trials = [_random_params(generator, ablator.n_layers) for _ in range(5)]
    results = {}
    for screened in (False, True):
        scoring = scoring_for(DEFAULT_REFUSAL_MARKERS)
        evaluator = evaluator_for(
            loaded,
            scoring,
            good=good,
            bad=bad,
            max_response_length=16,
            batch_size=16,
            unchanged_layers=ablator.unchanged_layers,
            reuse=ReuseOptions(screen_head=False),
        )
        scores = [scoring.score(evaluator.evaluate())]
        replies = []
        if screened:
            evaluator.reuse.head = _screen(loaded.model.get_output_embeddings())
        for params in trials:
            with ablator.applied(params):
                evaluation = evaluator.evaluate()
                scores.append(scoring.score(evaluation))
                replies.append((evaluation.harmful_replies(), evaluation.harmless_replies()))
        results[screened] = (scores, replies, evaluator)
    (plain, plain_replies, _), (screened, screened_replies, evaluator) = results.values()
    assert evaluator.reuse.head.screened_rows > 0
    assert screened_replies == plain_replies
    for alone, with_screen in zip(plain, screened, strict=True):
        assert with_screen.keys() == alone.keys()
        for name, score in alone.items():
            assert with_screen[name].value == pytest.approx(score.value, abs=1e-6), name
