"""Measuring a refusing model with the worker's own code: refusals, separation, direct edits.

The fixture scripts (make_tiny_refuser.py, make_real_refuser.py) and the fixture tests use it to
show what a model is before the worker is proven on it: how often it refuses, where its
harmful/harmless separation begins (as the search measures it), and what single-direction
edits of chosen layers do to its refusals and to the harmless first-token KL. Every number
comes from the worker's functions (loading, residuals, directions, the ablation engine, the
evaluator), so a fixture is measured exactly as a job would see it. Those imports are kept in
this one module.

    python scripts/refuser_probe.py tests/fixtures/tiny-refuser-spread   # the README's tables

measures a model folder with a prompts/ folder (harmful_train, harmless_train, harmful_test,
harmless_test): baseline refusals, separation per hidden state, full-depth edits with each
layer's direction, and edits of the layers from the onset on at weights 1 and 1.5.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from hctl_worker.ablation import AblationParams, Ablator, ComponentKernel
from hctl_worker.directions import last_token_residuals, layer_separation, refusal_directions
from hctl_worker.evaluation import EvaluationPrompts, Evaluator
from hctl_worker.generation import encode_texts, generate
from hctl_worker.model import load_model
from hctl_worker.priors import RefusalProfile
from hctl_worker.scorers import Scoring, build_scoring
from hctl_worker.settings import WorkerSettings
from hctl_worker.trials import Trial

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# The onset: the first layer whose output separates at least this share as well as the best one.
# (A description of a fixture, not something the worker searches by.)
ONSET_FRACTION = 0.5
COMPONENTS = ("attention", "mlp")


def separation_onset(separation: Sequence[float]) -> int | None:
    """The first layer whose output separates at least ONSET_FRACTION as well as the best one."""
    per_layer = [float(value) for value in list(separation)[1:]]
    finite = [value for value in per_layer if math.isfinite(value)]
    if not finite or max(finite) <= 0:
        return None
    threshold = ONSET_FRACTION * max(finite)
    return next(index for index, value in enumerate(per_layer) if value >= threshold)


@dataclass(frozen=True)
class Edit:
    """One single-direction edit: which direction, on which layers, how strongly.

    `direction` is the worker's direction index (k = the output of layer k; None = each layer
    its own direction); `first`..`last` are the edited layers, all at `weight`.
    """

    direction: float | None
    first: int
    last: int
    weight: float = 1.0

    def params(self) -> AblationParams:
        # A flat tent: max_weight == min_weight over the whole reach, zero outside it.
        kernel = ComponentKernel(
            max_weight=self.weight,
            max_weight_position=(self.first + self.last) / 2,
            min_weight=self.weight,
            min_weight_distance=(self.last - self.first) / 2,
        )
        return AblationParams(self.direction, {component: kernel for component in COMPONENTS})

    def describe(self) -> str:
        direction = "per layer" if self.direction is None else f"layer {self.direction:g}"
        return f"direction {direction}, layers {self.first}-{self.last}, weight {self.weight:g}"


@dataclass(frozen=True)
class EditResult:
    edit: Edit
    harmful_refusal: float
    harmless_refusal: float
    kl: float

    def as_dict(self) -> dict:
        return {**asdict(self.edit), **{k: v for k, v in asdict(self).items() if k != "edit"}}


class RefuserProbe:
    """A loaded model with its directions, separation and an evaluator on held-out prompts."""

    def __init__(
        self,
        folder: Path | str,
        *,
        harmful: Sequence[str],
        harmless: Sequence[str],
        harmful_eval: Sequence[str],
        harmless_eval: Sequence[str],
        max_new_tokens: int = 20,
        batch_size: int = 32,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    ) -> None:
        self.loaded = load_model(str(folder), dtypes=["float32"], device_map="cpu")
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        template = self.loaded.template
        bad = last_token_residuals(self.loaded, template(harmful, system_prompt), batch_size)
        good = last_token_residuals(self.loaded, template(harmless, system_prompt), batch_size)
        self.separation = [float(value) for value in layer_separation(bad, good)]
        self.onset = separation_onset(self.separation)
        self.directions = refusal_directions(bad, good)
        self.ablator = Ablator(self.loaded, self.directions)
        self.harmless_texts = template(harmless_eval, system_prompt)
        self.harmful_texts = template(harmful_eval, system_prompt)
        # The worker's default scorers (markers, first-token KL, harmless refusals), every one
        # measured in every call (no KL skip), replies of the same length for both sets.
        self.scorings = {
            harmless: build_scoring(
                WorkerSettings(
                    kl_skip_threshold=0,
                    max_response_length=max_new_tokens,
                    harmless_response_length=max_new_tokens,
                    scorers=[
                        {"name": "KeywordRate", "optimization": "minimize"},
                        {"name": "KLDivergence", "optimization": "minimize"},
                        *([{"name": "HarmlessRefusals"}] if harmless else []),
                    ],
                )
            )
            for harmless in (True, False)
        }
        self.evaluator = Evaluator.for_scoring(
            self.loaded,
            self.scorings[True],
            harmless=EvaluationPrompts(list(harmless_eval), self.harmless_texts),
            harmful=EvaluationPrompts(list(harmful_eval), self.harmful_texts),
            max_response_length=max_new_tokens,
            batch_size=batch_size,
            harmless_response_length=max_new_tokens,
        )

    @property
    def n_layers(self) -> int:
        return self.ablator.n_layers

    def replies(self, harmful: bool) -> list[str]:
        """Greedy replies to the held-out prompts of one kind, as the model is now."""
        texts = self.harmful_texts if harmful else self.harmless_texts
        return self.evaluator.responses(texts, self.max_new_tokens)

    def _score(self, scoring: Scoring) -> Trial:
        return Trial(number=0, scores=scoring.score(self.evaluator.evaluate()))

    def baseline(self) -> tuple[float, float]:
        """(harmful, harmless) held-out refusal rates of the unedited model."""
        scores = self._score(self.scorings[True])
        return scores.refusals / scores.total_bad, _rate(scores, "HarmlessRefusals")

    def measure(self, edit: Edit, *, harmless: bool = True) -> EditResult:
        """Refusal rates and KL with the edit applied (the model is restored afterwards).
        Without `harmless`, the harmless refusal rate is not measured (NaN): it needs full-length
        replies, the costliest part on a real model."""
        with self.ablator.applied(edit.params()):
            scores = self._score(self.scorings[harmless])  # markers, with early stops
        return EditResult(
            edit,
            harmful_refusal=(scores.refusals or 0) / scores.total_bad,
            harmless_refusal=_rate(scores, "HarmlessRefusals"),
            kl=scores.kl,
        )

    def full_depth(self, direction: float, weight: float = 1.0) -> Edit:
        return Edit(direction, 0, self.n_layers - 1, weight)

    def from_onset(self, direction: float | None, weight: float) -> Edit:
        """An edit of the layers from the separation onset to the last one."""
        onset = self.onset if self.onset is not None else 0
        return Edit(direction, onset, self.n_layers - 1, weight)


def _rate(trial: Trial, name: str) -> float:
    score = trial.scores.get(name)
    if score is None or score.value is None or not score.of:
        return float("nan")
    return score.value / score.of


def best_separating_layers(separation: Sequence[float], count: int) -> list[int]:
    """The layers whose directions the worker's canonical trials use: the best-separating
    layer, then the best of shallower depths (`RefusalProfile.best_layers`)."""
    profile = RefusalProfile(tuple(separation), written=(), components=())
    return profile.best_layers(count)


def greedy_replies(
    folder: Path | str,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    batch_size: int = 32,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> list[str]:
    """A model's greedy replies, generated by the worker's engine, in the prompts' order."""
    loaded = load_model(str(folder), dtypes=["float32"], device_map="cpu")
    batches = encode_texts(loaded, loaded.template(prompts, system_prompt), batch_size)
    return generate(loaded, batches, max_new_tokens)


def separation_table(separation: Sequence[float], onset: int | None) -> str:
    """Markdown: per hidden state, its separation (hidden state 0 = the embeddings)."""
    lines = ["| hidden state | output of | separation |", "|---|---|---|"]
    for index, value in enumerate(separation):
        where = "embeddings" if index == 0 else f"layer {index - 1}"
        mark = " (onset)" if onset is not None and index == onset + 1 else ""
        lines.append(f"| {index} | {where}{mark} | {value:.2f} |")
    return "\n".join(lines)


def edit_table(results: Sequence[EditResult]) -> str:
    lines = [
        "| direction (output of layer) | edited layers | weight | harmful refusal | "
        "harmless refusal | KL |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        edit = result.edit
        direction = "each its own" if edit.direction is None else f"{edit.direction:g}"
        lines.append(
            f"| {direction} | {edit.first}-{edit.last} | {edit.weight:g} | "
            f"{100 * result.harmful_refusal:.1f} % | {_percent(result.harmless_refusal)} | "
            f"{result.kl:.4f} |"
        )
    return "\n".join(lines)


def _percent(rate: float) -> str:
    return "not measured" if rate != rate else f"{100 * rate:.1f} %"


def read_prompt_files(folder: Path) -> dict[str, list[str]]:
    """A model folder's prompt sets: prompts/NAME.txt, one prompt per line."""
    return {
        path.stem: [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for path in sorted((folder / "prompts").glob("*.txt"))
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a model folder with a prompts/ folder")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    arguments = parser.parse_args(argv)
    import torch

    torch.set_num_threads(arguments.threads)
    prompts = read_prompt_files(arguments.folder)
    if not {"harmful_train", "harmless_train", "harmful_test", "harmless_test"} <= set(prompts):
        print(f"error: {arguments.folder} has no complete prompts/ folder", file=sys.stderr)
        print("hint: give a folder made by scripts/make_tiny_refuser.py --out", file=sys.stderr)
        return 2
    probe = RefuserProbe(
        arguments.folder,
        harmful=prompts["harmful_train"],
        harmless=prompts["harmless_train"],
        harmful_eval=prompts["harmful_test"],
        harmless_eval=prompts["harmless_test"],
        max_new_tokens=arguments.max_new_tokens,
    )
    harmful, harmless = probe.baseline()
    print(f"baseline refusals: harmful {100 * harmful:.1f} %, harmless {100 * harmless:.1f} %")
    print(separation_table(probe.separation, probe.onset), end="\n\n")
    layers = range(probe.n_layers)
    print(edit_table([probe.measure(probe.full_depth(layer)) for layer in layers]), end="\n\n")
    late = [probe.from_onset(d, w) for w in (1.0, 1.5) for d in [*layers, None]]
    print(edit_table([probe.measure(edit) for edit in late]))
    return 0


__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "Edit",
    "EditResult",
    "RefuserProbe",
    "best_separating_layers",
    "edit_table",
    "greedy_replies",
    "read_prompt_files",
    "separation_table",
]


if __name__ == "__main__":
    raise SystemExit(main())
