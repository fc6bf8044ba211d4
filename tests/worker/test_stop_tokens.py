"""Where a reply ends: the declared end-of-sequence tokens, and the token a chat template closes
an assistant turn with, found by rendering one (a model whose config names another token than
its template's turn end stops at the turn end all the same)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hctl_worker.generation import GenerationStats, encode_texts, generate
from hctl_worker.model import load_model
from hctl_worker.stop_tokens import stop_token_ids, turn_end_ids
from tests.conftest import REPO_ROOT

FIXTURES = REPO_ROOT / "tests" / "fixtures"

SPECIALS = ["<pad>", "</s>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>",
            "<|end_header_id|>", "<start_of_turn>", "<end_of_turn>"]  # fmt: skip

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content }}<|eot_id|>{% endfor %}"
)
GEMMA = (
    "{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{{ m.content }}<end_of_turn>\n{% endfor %}"
)
WORDS_FIRST = "{% for m in messages %}{{ m.role }}: {{ m.content }} (end of turn)</s>{% endfor %}"
NO_ASSISTANT = (
    "{% for m in messages %}{% if m.role == 'assistant' %}"
    "{{ raise_exception('no assistant turns') }}{% endif %}{{ m.content }}{% endfor %}"
)


def tokenizer(template: str | None) -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocabulary = {token: index for index, token in enumerate([*SPECIALS, *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocabulary, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", chat_template=template
    )


@pytest.mark.parametrize(
    ("template", "expected"),
    [(CHATML, "<|im_end|>"), (LLAMA3, "<|eot_id|>"), (GEMMA, "<end_of_turn>")],
)
def test_the_templates_turn_end_is_found_by_rendering_one(template: str, expected: str) -> None:
    found = tokenizer(template)
    assert turn_end_ids(found) == {found.convert_tokens_to_ids(expected)}


@pytest.mark.parametrize("template", [None, WORDS_FIRST, NO_ASSISTANT])
def test_no_turn_end_is_guessed_where_the_template_shows_none(template: str | None) -> None:
    assert turn_end_ids(tokenizer(template)) == set()


def test_a_model_that_declares_another_end_stops_at_its_templates_turn_end() -> None:
    """The tiny refuser closes its replies with <|im_end|> (and, not stopped, repeats it).
    Declared to end at <|endoftext|> only (as a fine-tune's config may say), it still stops
    there: the same replies from as many generated tokens."""
    loaded = load_model(str(FIXTURES / "tiny-refuser"), dtypes=["float32"], device_map="cpu")
    prompts = (FIXTURES / "tiny-refuser" / "prompts" / "harmful_test.txt").read_text()
    texts = loaded.template(prompts.splitlines()[:6], None)
    counted, recounted = GenerationStats(), GenerationStats()
    with torch.inference_mode():
        declared = generate(loaded, encode_texts(loaded, texts, 6), 48, stats=counted)
    turn_end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    other = loaded.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    loaded.tokenizer.eos_token = "<|endoftext|>"
    loaded.model.generation_config.eos_token_id = other
    with torch.inference_mode():
        misdeclared = generate(loaded, encode_texts(loaded, texts, 6), 48, stats=recounted)
    assert misdeclared == declared
    assert recounted.tokens == counted.tokens < 6 * 48
    assert all(len(reply) < 48 for reply in declared)  # each ended at its turn end
    assert turn_end in stop_token_ids(loaded) and other in stop_token_ids(loaded)
