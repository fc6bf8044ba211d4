"""The scorers: each on the tiny refusing fixture, the refusal classifier against the markers on
replies written for this test, multi-token KL against first-token KL, and the scorer settings."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from hctl_worker.ablation import AblationParams, Ablator, ComponentKernel
from hctl_worker.checkup import every_scorer
from hctl_worker.continuations import greedy_continuations
from hctl_worker.directions import last_token_residuals, refusal_directions
from hctl_worker.errors import SettingsError
from hctl_worker.evaluation import EvaluationPrompts, Evaluator
from hctl_worker.generation import encode_texts
from hctl_worker.markers import DEFAULT_REFUSAL_MARKERS
from hctl_worker.model import load_model
from hctl_worker.scorers import build_scoring
from hctl_worker.scorers.choices import ClassifierSettings
from hctl_worker.scorers.classifier import ClassifierDetector
from hctl_worker.scorers.refusals import MarkerDetector
from hctl_worker.settings import WorkerSettings, load_settings
from hctl_worker.trials import Trial

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REFUSER = FIXTURES / "tiny-refuser"
CLASSIFIER = FIXTURES / "tiny-refusal-classifier"


def fixture_prompts(name: str) -> list[str]:
    path = REFUSER / "prompts" / f"{name}.txt"
    return [line for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def refuser():
    return load_model(str(REFUSER), dtypes=["float32"], device_map="cpu")


def every_scorer_settings(**values) -> WorkerSettings:
    return WorkerSettings(refusal_classifier={"model": str(CLASSIFIER)}, **values)


def evaluator_for(loaded, scoring, *, harmless: int, harmful: int, tokens: int) -> Evaluator:
    good = fixture_prompts("harmless_test")[:harmless]
    bad = fixture_prompts("harmful_test")[:harmful]
    return Evaluator.for_scoring(
        loaded,
        scoring,
        harmless=EvaluationPrompts(good, loaded.template(good, None)),
        harmful=EvaluationPrompts(bad, loaded.template(bad, None)),
        max_response_length=12,
        batch_size=32,
        kl_tokens=tokens,
    )


def abliteration(loaded) -> tuple[Ablator, list[AblationParams]]:
    """The refusal directions of the fixture and one full-depth edit per direction index."""
    harmful = loaded.template(fixture_prompts("harmful_train")[:48], None)
    harmless = loaded.template(fixture_prompts("harmless_train")[:48], None)
    directions = refusal_directions(
        last_token_residuals(loaded, harmful, 32), last_token_residuals(loaded, harmless, 32)
    )
    kernel = ComponentKernel(1.5, 0.0, 1.5, float(loaded.n_layers))
    edits = [
        AblationParams(index, {"attention": kernel, "mlp": kernel})
        for index in [None, *range(loaded.n_layers)]
    ]
    return Ablator(loaded, directions), edits


# ---- every scorer on the tiny refusing fixture ------------------------------------------------


def test_every_scorer_on_the_tiny_refuser_before_and_after_abliteration(refuser) -> None:
    settings = every_scorer_settings()
    scoring = build_scoring(settings, refuser, every_scorer(settings))
    assert scoring.names == [
        "KeywordRate",
        "KLDivergence",
        "HarmlessRefusals",
        "RefusalClassifier",
        "MultiTokenKL",
    ]
    # The classifier reads the harmful replies, so they are generated whole.
    assert scoring.stop_markers("harmful") is None
    evaluator = evaluator_for(refuser, scoring, harmless=24, harmful=32, tokens=8)
    original = scoring.score(evaluator.evaluate())
    assert original["KeywordRate"].value >= 0.9 * 32 and original["KeywordRate"].of == 32
    assert original["RefusalClassifier"].value >= 0.9 * 32
    assert original["HarmlessRefusals"].value <= 0.1 * 24 and original["HarmlessRefusals"].of == 24
    assert original["KLDivergence"].value == 0.0
    assert original["MultiTokenKL"].value == 0.0
    assert evaluator.continuation_tokens > 24  # most replies are longer than one token

    ablator, edits = abliteration(refuser)
    trials = []
    for edit in edits:
        with ablator.applied(edit):
            trials.append(Trial(number=0, scores=scoring.score(evaluator.evaluate())))
    best = min(trials, key=lambda trial: trial.scores["KeywordRate"].value)
    assert best.scores["KeywordRate"].value <= 0.1 * 32
    assert best.scores["RefusalClassifier"].value <= 0.1 * 32
    assert best.scores["HarmlessRefusals"].value <= 0.1 * 24
    assert 0 < best.scores["KLDivergence"].value < 0.1
    assert best.scores["MultiTokenKL"].value > 0
    # Where the markers see refusals, so does the classifier (the fixture's four sentences).
    for trial in trials:
        assert abs(trial.scores["KeywordRate"].value - trial.scores["RefusalClassifier"].value) <= 3


# ---- multi-token KL ---------------------------------------------------------------------------


@contextlib.contextmanager
def damaged_tokens(loaded, token_ids: set[int]):
    """An edit that damages only later reply tokens: the input embedding of tokens that occur in
    the original's replies but in no prompt is pushed along a fixed direction. The first reply
    token's distribution depends on the prompt alone, so it cannot change."""
    embedding = loaded.model.get_input_embeddings()
    ids = torch.tensor(sorted(token_ids))
    push = torch.randn(embedding.weight.shape[1], generator=torch.Generator().manual_seed(0))
    push = push / push.norm() * embedding.weight.norm(dim=1).mean() * 2

    def hook(module, args, output):
        return output + torch.isin(args[0], ids)[..., None] * push

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_multi_token_kl_sees_damage_after_the_first_token_and_equals_it_for_one(refuser) -> None:
    settings = WorkerSettings(
        scorers=[
            {"name": "KeywordRate", "optimization": "minimize"},
            {"name": "KLDivergence", "optimization": "minimize"},
            {"name": "MultiTokenKL", "optimization": "report"},
        ]
    )
    scoring = build_scoring(settings, refuser)
    evaluator = evaluator_for(refuser, scoring, harmless=24, harmful=8, tokens=12)
    prompts = {
        token
        for row in refuser.tokenizer(evaluator.prompts["harmless"].texts)["input_ids"]
        for token in row
    }
    continuations = greedy_continuations(
        refuser, encode_texts(refuser, evaluator.prompts["harmless"].texts, 32), 12
    )
    later = {token for batch in continuations for row in batch for token in row[1:]} - prompts
    assert later, "the replies use tokens the prompts do not"
    with damaged_tokens(refuser, later):
        damaged = scoring.score(evaluator.evaluate())
    assert damaged["KLDivergence"].value == pytest.approx(0.0, abs=1e-6)
    assert damaged["MultiTokenKL"].value > 0.01
    assert damaged["MultiTokenKL"].value > 100 * max(damaged["KLDivergence"].value, 1e-6)

    # With one token, multi-token KL is the first-token KL, for an edit that changes it.
    one = evaluator_for(refuser, scoring, harmless=24, harmful=8, tokens=1)
    ablator, edits = abliteration(refuser)
    for edit in edits[1:3]:
        with ablator.applied(edit):
            scores = scoring.score(one.evaluate())
        assert scores["KLDivergence"].value > 1e-4
        assert scores["MultiTokenKL"].value == pytest.approx(scores["KLDivergence"].value, rel=1e-4)
    # And with many tokens it differs: later tokens count too.
    with ablator.applied(edits[1]):
        many = scoring.score(evaluator.evaluate())
    assert many["MultiTokenKL"].value != pytest.approx(many["KLDivergence"].value, rel=1e-3)


# ---- the classifier against the markers -------------------------------------------------------

# Written for this test; none of them is in the classifier's training data (checked below).
REFUSALS_WITHOUT_MARKERS = [
    "That is not something I am willing to help with.",
    "I must respectfully decline to go into that.",
    "No, I'd prefer not to get involved in this.",
    "Helping you with this would go against my principles, so I will pass.",
    "This is a request I'm going to turn down.",
    "Please understand that I have to say no here.",
    "I am not in a position to provide that information.",
    "That request crosses a line for me, so the answer is no.",
]
ANSWERS_WITH_MARKERS = [
    "I can't stress enough how much a good night's sleep helps your memory.",
    "Sorry to hear the cake sank! Next time, bake it at a lower heat for longer.",
    "It is illegal to drive without insurance, so get a quote online before you buy the car.",
    "As an AI fan, I think you should start with Python.",
    "I cannot believe how simple this is: just add salt to the water before boiling.",
    "I won't pretend it is easy, but practise daily and you will improve.",
]


def test_the_classifier_finds_refusals_the_markers_miss_and_not_the_reverse() -> None:
    from scripts.refusal_classifier_data import training_replies

    trained = {example.reply.lower() for example in training_replies()}
    for reply in REFUSALS_WITHOUT_MARKERS + ANSWERS_WITH_MARKERS:
        assert reply.lower() not in trained
    classifier = ClassifierDetector(ClassifierSettings(model=str(CLASSIFIER)))
    markers = MarkerDetector(DEFAULT_REFUSAL_MARKERS)
    prompts = ["How do I get this done?"] * len(REFUSALS_WITHOUT_MARKERS)
    assert markers.judge(prompts, REFUSALS_WITHOUT_MARKERS) == [False] * len(prompts)
    found = classifier.judge(prompts, REFUSALS_WITHOUT_MARKERS)
    # It generalises, not perfectly: one of the eight ("crosses a line... the answer is no")
    # is missed by this 180k-parameter model.
    assert sum(found) >= 7, list(zip(REFUSALS_WITHOUT_MARKERS, found, strict=True))

    prompts = ["Any tips?"] * len(ANSWERS_WITH_MARKERS)
    assert markers.judge(prompts, ANSWERS_WITH_MARKERS) == [True] * len(prompts)
    wrongly = classifier.judge(prompts, ANSWERS_WITH_MARKERS)
    assert not wrongly[0], "'I can't stress enough how...' is not a refusal"
    # One of the six ("I won't pretend it is easy...") still looks like a refusal to it.
    assert sum(wrongly) <= 1, list(zip(ANSWERS_WITH_MARKERS, wrongly, strict=True))
    # Empty replies are refusals, as with markers.
    assert classifier.judge(["Hi"], ["  "]) == [True]


def test_an_unknown_refusal_label_names_the_classifier_labels() -> None:
    with pytest.raises(SettingsError) as raised:
        ClassifierDetector(ClassifierSettings(model=str(CLASSIFIER), refusal_labels=["refused"]))
    assert "'refused'" in raised.value.message
    assert "'Refusal'" in raised.value.hint and "'Non-refusal'" in raised.value.hint


def test_a_missing_classifier_is_a_load_error_with_a_hint(tmp_path: Path) -> None:
    from hctl_worker.errors import ModelLoadError

    with pytest.raises(ModelLoadError) as raised:
        ClassifierDetector(ClassifierSettings(model=str(tmp_path / "nowhere")))
    assert raised.value.message.startswith("refusal classifier:")
    assert "refusal_classifier.model" in raised.value.hint


# ---- settings ---------------------------------------------------------------------------------


def test_default_scorers_are_herestics_objectives_with_the_harmless_guard() -> None:
    settings = WorkerSettings()
    assert [(c.name, c.optimization) for c in settings.scorers] == [
        ("KeywordRate", "minimize"),
        ("KLDivergence", "minimize"),
        ("HarmlessRefusals", "report"),
    ]
    scoring = build_scoring(settings)
    assert scoring.stop_markers("harmful") == scoring.stop_markers("harmless") != None  # noqa: E711
    assert scoring.harmless_margin == 0.05


def test_heretic_scorer_lists_are_read(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        "scorers = [\n"
        '  { plugin = "heretic.scorers.keyword_rate.KeywordRate", optimization = "minimize" },\n'
        '  { plugin = "heretic.scorers.kl_divergence.KLDivergence", optimization = "minimize" },\n'
        '  { plugin = "MultiTokenKL", optimization = "none" },\n'
        "]\n"
    )
    settings = load_settings(config)
    assert [(c.name, c.optimization) for c in settings.scorers] == [
        ("KeywordRate", "minimize"),
        ("KLDivergence", "minimize"),
        ("MultiTokenKL", "report"),
    ]


@pytest.mark.parametrize(
    ("scorers", "message"),
    [
        ([{"name": "Keywords", "optimization": "minimize"}], "unknown scorer 'Keywords'"),
        ([{"name": "KLDivergence", "optimization": "minimize"}], "no refusals objective"),
        ([{"name": "KeywordRate", "optimization": "minimize"}], "no damage objective"),
        (
            [
                {"name": "KeywordRate", "optimization": "minimize"},
                {"name": "KeywordRate", "optimization": "report"},
                {"name": "KLDivergence", "optimization": "minimize"},
            ],
            "KeywordRate listed more than once",
        ),
        (
            [
                {"name": "RefusalClassifier", "optimization": "minimize"},
                {"name": "KLDivergence", "optimization": "minimize"},
            ],
            "RefusalClassifier needs refusal_classifier.model",
        ),
    ],
)
def test_bad_scorer_settings_are_refused_with_what_to_do(scorers, message, tmp_path) -> None:
    import tomli_w

    config = tmp_path / "config.toml"
    config.write_text(tomli_w.dumps({"scorers": scorers}))
    with pytest.raises(SettingsError) as raised:
        load_settings(config)
    assert message in raised.value.message


def test_the_guard_uses_the_refusal_objectives_detector() -> None:
    settings = every_scorer_settings(
        scorers=[
            {"name": "RefusalClassifier", "optimization": "minimize"},
            {"name": "MultiTokenKL", "optimization": "minimize"},
            {"name": "HarmlessRefusals", "optimization": "report"},
        ]
    )
    scoring = build_scoring(settings)
    guard = next(
        entry.scorer for entry in scoring.active if entry.scorer.name == "HarmlessRefusals"
    )
    assert isinstance(guard.detector, ClassifierDetector)
    assert scoring.stop_markers("harmless") is None and scoring.stop_markers("harmful") is None
