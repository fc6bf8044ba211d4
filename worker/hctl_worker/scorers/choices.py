"""The scorer settings: which scorers a job runs and how (`scorers`), and the refusal classifier
(`refusal_classifier`). Torch-free: the worker's settings are checked before anything heavy."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ScorerChoice(BaseModel):
    """One scorer the job runs (a name from `hctl_worker.scorers.SCORERS`) and what the search
    does with it: "minimize" or "maximize" it as an objective, or only "report" it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    optimization: Literal["minimize", "maximize", "report"] = "report"

    @model_validator(mode="before")
    @classmethod
    def _heretic_form(cls, value: Any) -> Any:
        """heretic's `{ plugin = "heretic.scorers.keyword_rate.KeywordRate", optimization =
        "none" }`: the class name is the scorer's name, "none" means report only."""
        if isinstance(value, str):
            return {"name": value}
        if not isinstance(value, Mapping):
            return value
        value = dict(value)
        if "plugin" in value and "name" not in value:
            value["name"] = re.split(r"[.:]", str(value.pop("plugin")))[-1]
        if value.get("optimization") == "none":
            value["optimization"] = "report"
        if value.get("instance_name"):
            raise ValueError("instance_name is not supported: each scorer runs once")
        value.pop("instance_name", None)
        return value

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from hctl_worker.scorers import SCORERS

        if name not in SCORERS:
            raise ValueError(f"unknown scorer '{name}'; the scorers are {', '.join(SCORERS)}")
        return name


DEFAULT_SCORERS = (
    ScorerChoice(name="KeywordRate", optimization="minimize"),
    ScorerChoice(name="KLDivergence", optimization="minimize"),
    ScorerChoice(name="HarmlessRefusals", optimization="report"),
)

MINOS_TEMPLATE = "<|user|>\n{prompt}\n<|assistant|>\n{reply}"


class ClassifierSettings(BaseModel):
    """The sequence-classification model the RefusalClassifier scorer judges replies with."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="Hub id or local folder.")
    commit: str | None = Field(default=None, description="Hub revision of the classifier.")
    refusal_labels: list[str] = Field(default_factory=lambda: ["Refusal"], min_length=1)
    input_template: str = MINOS_TEMPLATE
    batch_size: int = Field(default=16, ge=1)
    max_length: int = Field(default=512, ge=8)

    @field_validator("input_template")
    @classmethod
    def _has_reply(cls, template: str) -> str:
        if "{reply}" not in template:
            raise ValueError("the input template must contain {reply} (and may contain {prompt})")
        return template


def check_choices(choices: Sequence[ScorerChoice], classifier: ClassifierSettings) -> None:
    """Each scorer once, a refusal objective and a damage objective, and a classifier model
    when the RefusalClassifier runs; a ValueError says what is wrong."""
    from hctl_worker.scorers import SCORERS

    names = [choice.name for choice in choices]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"scorers: {', '.join(repeated)} listed more than once")
    objectives = [SCORERS[c.name].role for c in choices if c.optimization != "report"]
    for role, example in (("refusals", "KeywordRate"), ("damage", "KLDivergence")):
        if role not in objectives:
            raise ValueError(
                f'scorers: no {role} objective; give one (e.g. {example}) optimization "minimize"'
            )
    if "RefusalClassifier" in names and not classifier.model:
        raise ValueError(
            "scorers: RefusalClassifier needs refusal_classifier.model (a hub id or folder "
            'of a sequence-classification model, e.g. "NousResearch/Minos-v1")'
        )


__all__ = [
    "DEFAULT_SCORERS",
    "MINOS_TEMPLATE",
    "ClassifierSettings",
    "ScorerChoice",
    "check_choices",
]
