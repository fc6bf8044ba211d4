"""A refusal detector that asks a Hugging Face sequence-classification model.

Markers miss refusals phrased in other words ("That is not something I will help with") and
count replies that merely contain a marker word ("I can't stress enough how...") as refusals.
A classifier trained on refusals (for example NousResearch/Minos-v1, a ModernBERT) judges the
whole exchange instead. Each prompt and reply are rendered into one text with the settings'
`input_template` (Minos's format by default), classified in batches on the device of the model
being abliterated, and a reply counts as a refusal when the predicted label is one of
`refusal_labels` (or when it is empty, as with markers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hctl_worker.errors import ModelLoadError, SettingsError

if TYPE_CHECKING:
    import torch

    from hctl_worker.scorers.choices import ClassifierSettings


class ClassifierDetector:
    """Judges replies with a sequence-classification model."""

    def __init__(self, settings: ClassifierSettings, device: torch.device | str = "cpu") -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from hctl_worker.model_errors import translate_error

        if not settings.model:
            raise SettingsError(
                "the RefusalClassifier scorer needs a classifier model",
                "Set refusal_classifier.model to a hub id or folder of a sequence-classification "
                'model, e.g. [refusal_classifier] model = "NousResearch/Minos-v1".',
            )
        self.settings = settings
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(settings.model, revision=settings.commit)
            model = AutoModelForSequenceClassification.from_pretrained(
                settings.model, revision=settings.commit
            )
        except Exception as error:
            raise _classifier_error(translate_error(error, settings.model)) from error
        self.model = model.to(device).eval()
        self.refusal_ids = self._refusal_label_ids()

    def _refusal_label_ids(self) -> frozenset[int]:
        labels = {
            int(index): str(name) for index, name in (self.model.config.id2label or {}).items()
        }
        by_name = {name.lower(): index for index, name in labels.items()}
        unknown = [label for label in self.settings.refusal_labels if label.lower() not in by_name]
        if unknown:
            raise SettingsError(
                f"the refusal classifier {self.settings.model} has no label "
                + ", ".join(repr(label) for label in unknown),
                "Set refusal_classifier.refusal_labels to its labels that mean a refusal; it has "
                + ", ".join(repr(name) for name in labels.values())
                + ".",
            )
        return frozenset(by_name[label.lower()] for label in self.settings.refusal_labels)

    @property
    def decisive_markers(self) -> tuple[str, ...] | None:
        return None  # only the whole reply tells

    def render(self, prompt: str, reply: str) -> str:
        """The classifier's input for one exchange (replace, not format: replies hold braces)."""
        return self.settings.input_template.replace("{prompt}", prompt).replace("{reply}", reply)

    def judge(self, prompts: Sequence[str], replies: Sequence[str]) -> list[bool]:
        import torch

        texts = [self.render(prompt, reply) for prompt, reply in zip(prompts, replies, strict=True)]
        verdicts = [not reply.strip() for reply in replies]
        # Similar lengths together: less padding per batch.
        order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
        device = next(self.model.parameters()).device
        size = max(1, self.settings.batch_size)
        with torch.inference_mode():
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                encoded = self.tokenizer(
                    [texts[index] for index in chunk],
                    padding=True,
                    truncation=True,
                    max_length=self.settings.max_length,
                    return_tensors="pt",
                ).to(device)
                predicted = self.model(**encoded).logits.argmax(dim=-1).tolist()
                for index, label in zip(chunk, predicted, strict=True):
                    verdicts[index] = verdicts[index] or label in self.refusal_ids
        return verdicts


def _classifier_error(error: Exception) -> Exception:
    """Say that it was the refusal classifier that failed to load, not the model."""
    if isinstance(error, ModelLoadError):
        return ModelLoadError(
            f"refusal classifier: {error.message}",
            "Set refusal_classifier.model to a local folder or hub id of a sequence-"
            "classification model (e.g. NousResearch/Minos-v1); " + error.hint,
        )
    return error
