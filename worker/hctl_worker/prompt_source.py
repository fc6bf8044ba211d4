"""Where a set of prompts comes from, and the default prompt sets (heretic's). Torch-free."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator


class PromptSource(BaseModel):
    """Where a set of prompts comes from: a hub dataset (id, split, column) or a local text file.

    `dataset` is a hub dataset id, a local folder saved by `datasets`, or a plain text file with
    one prompt per line. `split` is a split name with an optional slice (`train[:400]`,
    `test[10:20]`, `train[:10%]`); for a text file only the slice part counts (`[:400]`).
    """

    model_config = ConfigDict(extra="forbid")

    dataset: str
    split: str | None = None
    column: str = "text"
    prefix: str = Field(default="", description="Text put before every prompt (with a space).")
    suffix: str = Field(default="", description="Text put after every prompt (with a space).")
    commit: str | None = Field(default=None, description="Dataset revision (hub datasets).")

    @field_validator("split")
    @classmethod
    def _check_split(cls, value: str | None) -> str | None:
        if value is not None and not SPLIT_PATTERN.fullmatch(value.strip()):
            raise ValueError(
                f"'{value}' is not a split: write a name and an optional slice, "
                "e.g. 'train', 'train[:400]', 'test[10:20]', '[:50%]'"
            )
        return value


SPLIT_PATTERN = re.compile(
    r"(?P<name>[\w.-]*)\s*(\[\s*(?P<start>-?\d+%?)?\s*:\s*(?P<end>-?\d+%?)?\s*\])?"
)


GOOD_PROMPTS = PromptSource(dataset="mlabonne/harmless_alpaca", split="train[:400]")
BAD_PROMPTS = PromptSource(dataset="mlabonne/harmful_behaviors", split="train[:400]")
GOOD_EVALUATION_PROMPTS = PromptSource(dataset="mlabonne/harmless_alpaca", split="test[:100]")
BAD_EVALUATION_PROMPTS = PromptSource(dataset="mlabonne/harmful_behaviors", split="test[:100]")

# The settings' four prompt tables.
PROMPT_TABLES = ("good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts")


__all__ = [
    "BAD_EVALUATION_PROMPTS",
    "BAD_PROMPTS",
    "GOOD_EVALUATION_PROMPTS",
    "GOOD_PROMPTS",
    "PROMPT_TABLES",
    "SPLIT_PATTERN",
    "PromptSource",
]
