"""Where a reply ends: the tokens that finish a generated reply.

The model's declared end-of-sequence tokens (its tokenizer's, its generation config's) are what
`generate()` stops at. Many fine-tunes declare one token while their chat template closes an
assistant turn with another (a ChatML template on a model whose config names `</s>`, say): such a
model writes its turn's end and then goes on with a turn nobody asked for, which a refusal
detector would read as part of the reply. So the token the chat template puts right after an
assistant message is found by rendering one, and ends a reply too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hctl_worker.model import LoadedModel

_PROBE = "hctl reply ends here"


def stop_token_ids(loaded: LoadedModel) -> set[int]:
    """The declared end-of-sequence tokens and the chat template's end of an assistant turn."""
    ids = declared_stop_ids(loaded)
    ids.update(turn_end_ids(loaded.tokenizer))
    return ids


def declared_stop_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    eos = loaded.tokenizer.eos_token_id
    if eos is not None:
        ids.add(int(eos))
    config_eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, (list, tuple)):
        ids.update(int(token) for token in config_eos)
    return ids


def turn_end_ids(tokenizer: Any) -> set[int]:
    """The special token the chat template writes right after an assistant message (nothing
    when there is no template, it renders no such message, or plain text comes first)."""
    if not getattr(tokenizer, "chat_template", None):
        return set()
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": _PROBE},
    ]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # Jinja's errors: a template that renders no assistant turn this way
        return set()
    if not isinstance(text, str) or _PROBE not in text:
        return set()
    after = text.rpartition(_PROBE)[2]
    special = _special_ids(tokenizer)
    for token in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token in special:
            return {int(token)}
        if tokenizer.decode([token]).strip():
            return set()  # words before any special token: not a turn's end we can tell
    return set()


def _special_ids(tokenizer: Any) -> set[int]:
    ids = {int(token) for token in getattr(tokenizer, "all_special_ids", [])}
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


__all__ = ["declared_stop_ids", "stop_token_ids", "turn_end_ids"]
