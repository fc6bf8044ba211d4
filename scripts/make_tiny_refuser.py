"""Make (or measure) a tiny causal language model that really refuses harmful requests.

It is the test fixture the worker is proven on: trained on the CPU in a minute or two, a few MB,
committed under tests/fixtures/. The script
  1. builds synthetic single-turn chats (scripts/tiny_refuser_data.py) and writes the prompt
     splits as text files, one prompt per line, under OUT/prompts/;
  2. trains a ByteLevel BPE tokenizer with a ChatML chat template (the default system prompt
     "You are a helpful assistant." is added when a conversation has no system turn);
  3. trains a tiny Qwen3, Llama or Qwen2 model on those chats, always with that system prompt;
  4. saves it with save_pretrained (safetensors) and prints the measured refusal rates.

Where the refusal is computed is steered by freezing decoder layers at their random
initialisation (`--refusal-depth`): "late" freezes the first half, so only the later layers can
tell harmful from harmless; "early" freezes the second half, so the decision has to be written
into the residual stream by the first layers; "free" trains everything.

`--measure DIR` loads a saved model and prints, for each hidden-state index, the held-out refusal
rates and the harmless first-token KL after projecting that index's difference-of-means refusal
direction out of the attention-output and MLP-down weights of all layers, of the first half only
and of the second half only.

    python scripts/make_tiny_refuser.py --out tests/fixtures/tiny-refuser --arch qwen3 --refusal-depth late
    python scripts/make_tiny_refuser.py --measure tests/fixtures/tiny-refuser
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as functional  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)
from transformers.utils import logging as transformers_logging  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_training import optimizer_step  # noqa: E402
from tiny_refuser_data import (  # noqa: E402
    DEFAULT_SYSTEM_PROMPT,
    HARMLESS_OPENINGS,
    REFUSAL_SETS,
    Example,
    build_split,
    is_refusal,
)

PAD_TOKEN = "<|endoftext|>"
START_TOKEN = "<|im_start|>"
END_TOKEN = "<|im_end|>"

# ChatML, like Qwen's: a conversation without a system turn gets the default system prompt, so
# the model sees the same text whether or not a caller sends that prompt itself.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

PROMPT_FILES = ("harmful_train", "harmless_train", "harmful_test", "harmless_test")
ARCHITECTURES = ("qwen3", "llama", "qwen2", "mistral", "phi3")
DEPTHS = ("early", "late", "free")


# ---------------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------------


def render_prompt(prompt: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The chat-template text of a single user turn, ending where the assistant starts."""
    return (
        f"{START_TOKEN}system\n{system_prompt}{END_TOKEN}\n"
        f"{START_TOKEN}user\n{prompt}{END_TOKEN}\n{START_TOKEN}assistant\n"
    )


def train_tokenizer(examples: Sequence[Example], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer learned from the training chats, with the ChatML template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, START_TOKEN, END_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [render_prompt(example.prompt) + example.reply + END_TOKEN for example in examples]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=END_TOKEN,
        additional_special_tokens=[START_TOKEN],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=256,
    )


def build_model(
    arch: str, hidden: int, layers: int, vocab_size: int, pad_id: int, end_id: int
) -> torch.nn.Module:
    """A randomly initialised tiny causal LM of the chosen architecture."""
    head_dim = min(32, hidden)
    heads = max(1, hidden // head_dim)
    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": end_id,
        "pad_token_id": pad_id,
    }
    if arch == "qwen3":
        config = Qwen3Config(head_dim=head_dim, **common)
    elif arch == "llama":
        config = LlamaConfig(head_dim=head_dim, **common)
    elif arch == "mistral":
        config = MistralConfig(head_dim=head_dim, sliding_window=None, **common)
    elif arch == "phi3":
        # Fused projections (qkv_proj, gate_up_proj): the worker must find o_proj/down_proj by
        # structure, not by the Llama names of their inputs.
        config = Phi3Config(**common)
    else:
        config = Qwen2Config(**common)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def frozen_layer_indices(depth: str, layers: int) -> list[int]:
    """Which decoder layers keep their random initialisation for a refusal depth."""
    half = layers // 2
    if depth == "late":
        return list(range(half))
    if depth == "early":
        return list(range(layers - half, layers))
    return []


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]


def encode_examples(
    tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example]
) -> list[EncodedExample]:
    """Token ids of each chat; only the assistant's reply (and its end token) carries a loss."""
    encoded = []
    for example in examples:
        prompt_ids = tokenizer.encode(render_prompt(example.prompt), add_special_tokens=False)
        reply_ids = tokenizer.encode(example.reply + END_TOKEN, add_special_tokens=False)
        encoded.append(EncodedExample(prompt_ids + reply_ids, [-100] * len(prompt_ids) + reply_ids))
    return encoded


def collate(batch: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, example in enumerate(batch):
        size = len(example.input_ids)
        input_ids[row, :size] = torch.tensor(example.input_ids)
        labels[row, :size] = torch.tensor(example.labels)
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def train(
    model: torch.nn.Module,
    encoded: Sequence[EncodedExample],
    pad_id: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> float:
    """AdamW with warm-up and cosine decay on the trainable parameters; returns the last loss."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.01)
    warmup = max(1, min(50, steps // 6))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        indices = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
        batch = collate([encoded[index] for index in indices], pad_id)
        loss_value = optimizer_step(model(**batch).loss, trainable, optimizer, scheduler)
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss_value:.4f}", flush=True)
    model.eval()
    return loss_value


# ---------------------------------------------------------------------------------------------
# Measuring: generation, refusal rates, directions, ablation, KL
# ---------------------------------------------------------------------------------------------


def encode_prompts(tokenizer, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    texts = [
        tokenizer.apply_chat_template(
            [
                {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": prompt},
            ],
            add_generation_prompt=True,
            tokenize=False,
        )
        for prompt in prompts
    ]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def generate_replies(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 20, batch_size: int = 64
) -> list[str]:
    """Greedy replies to the prompts, with the default system prompt, batched with left padding."""
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        inputs = encode_prompts(tokenizer, prompts[start : start + batch_size])
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        replies.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return replies


def refusal_rate(replies: Sequence[str]) -> float:
    return sum(is_refusal(reply) for reply in replies) / max(1, len(replies))


@torch.no_grad()
def last_token_hidden_states(model, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Hidden states at the last prompt token: shape (prompts, layers + 1, hidden)."""
    inputs = encode_prompts(tokenizer, prompts)
    output = model(**inputs, output_hidden_states=True)
    return torch.stack([state[:, -1, :] for state in output.hidden_states], dim=1).float()


@torch.no_grad()
def first_token_log_probabilities(model, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    inputs = encode_prompts(tokenizer, prompts)
    return functional.log_softmax(model(**inputs).logits[:, -1, :].float(), dim=-1)


def refusal_directions(
    model, tokenizer, harmful: Sequence[str], harmless: Sequence[str]
) -> torch.Tensor:
    """Normalised difference of means at every hidden-state index: shape (layers + 1, hidden)."""
    difference = last_token_hidden_states(model, tokenizer, harmful).mean(0)
    difference -= last_token_hidden_states(model, tokenizer, harmless).mean(0)
    return functional.normalize(difference, dim=-1)


def ablated_matrices(model, layer_indices: Sequence[int]) -> list[torch.nn.Parameter]:
    """The weights that write into the residual stream in the given layers."""
    layers = model.model.layers
    return [
        matrix
        for index in layer_indices
        for matrix in (layers[index].self_attn.o_proj.weight, layers[index].mlp.down_proj.weight)
    ]


@dataclass
class Measurement:
    harmful_refusal: float
    harmless_refusal: float
    kl: float


@contextlib.contextmanager
def direction_projected_out(
    model, direction: torch.Tensor, layer_indices: Sequence[int]
) -> Iterator[None]:
    """Within the block, the layers' output weights write nothing along the direction."""
    matrices = ablated_matrices(model, layer_indices)
    originals = [matrix.detach().clone() for matrix in matrices]
    with torch.no_grad():
        for matrix in matrices:
            matrix -= torch.outer(direction, direction @ matrix)
    try:
        yield
    finally:
        with torch.no_grad():
            for matrix, original in zip(matrices, originals, strict=True):
                matrix.copy_(original)


def measure_ablation(
    model,
    tokenizer,
    direction: torch.Tensor,
    layer_indices: Sequence[int],
    harmful_test: Sequence[str],
    harmless_test: Sequence[str],
    baseline_log_probabilities: torch.Tensor,
    max_new_tokens: int,
) -> Measurement:
    """Refusals and KL with the direction projected out of the layers' output weights."""
    with direction_projected_out(model, direction, layer_indices):
        harmful = refusal_rate(
            generate_replies(model, tokenizer, harmful_test, max_new_tokens=max_new_tokens)
        )
        harmless = refusal_rate(
            generate_replies(model, tokenizer, harmless_test, max_new_tokens=max_new_tokens)
        )
        log_probabilities = first_token_log_probabilities(model, tokenizer, harmless_test)
    kl = functional.kl_div(
        log_probabilities, baseline_log_probabilities, reduction="batchmean", log_target=True
    ).item()
    return Measurement(harmful, harmless, kl)


def read_prompts(folder: Path) -> dict[str, list[str]]:
    return {
        name: [
            line
            for line in (folder / f"{name}.txt").read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        for name in PROMPT_FILES
    }


def load_model(folder: Path):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def baseline_report(model, tokenizer, prompts: dict[str, list[str]], max_new_tokens: int) -> dict:
    rates = {
        name: refusal_rate(
            generate_replies(model, tokenizer, prompts[name], max_new_tokens=max_new_tokens)
        )
        for name in PROMPT_FILES
    }
    for name in PROMPT_FILES:
        print(f"refusal rate {name:15s} {100 * rates[name]:5.1f} %  ({len(prompts[name])} prompts)")
    return rates


def measure(folder: Path, max_new_tokens: int, direction_prompts: int) -> list[dict]:
    """The per-index abliteration table for a saved model (printed as Markdown and returned)."""
    model, tokenizer = load_model(folder)
    prompts = read_prompts(folder / "prompts")
    baseline_report(model, tokenizer, prompts, max_new_tokens)
    layer_count = len(model.model.layers)
    half = layer_count // 2
    ranges = {
        "all": list(range(layer_count)),
        f"0-{half - 1}": list(range(half)),
        f"{half}-{layer_count - 1}": list(range(half, layer_count)),
    }
    directions = refusal_directions(
        model,
        tokenizer,
        prompts["harmful_train"][:direction_prompts],
        prompts["harmless_train"][:direction_prompts],
    )
    baseline = first_token_log_probabilities(model, tokenizer, prompts["harmless_test"])
    rows = []
    print()
    print(
        "| direction index | ablated layers | harmful test refusal | harmless test refusal | KL |"
    )
    print("|---|---|---|---|---|")
    # Index 0 is the embedding output; at the last prompt token it is the same token for every
    # prompt, so its difference of means is zero and there is no direction to measure.
    for index in range(1, layer_count + 1):
        for range_name, layer_indices in ranges.items():
            started = time.perf_counter()
            result = measure_ablation(
                model,
                tokenizer,
                directions[index],
                layer_indices,
                prompts["harmful_test"],
                prompts["harmless_test"],
                baseline,
                max_new_tokens,
            )
            rows.append(
                {
                    "direction_index": index,
                    "layers": range_name,
                    "harmful_refusal": result.harmful_refusal,
                    "harmless_refusal": result.harmless_refusal,
                    "kl": result.kl,
                    "seconds": time.perf_counter() - started,
                }
            )
            print(
                f"| {index} | {range_name} | {100 * result.harmful_refusal:.1f} % "
                f"| {100 * result.harmless_refusal:.1f} % | {result.kl:.4f} |",
                flush=True,
            )
    return rows


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder to write the model into")
    parser.add_argument("--measure", type=Path, metavar="DIR", help="measure a saved model")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="qwen3")
    parser.add_argument("--refusal-depth", choices=DEPTHS, default="free")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--direction-prompts", type=int, default=64)
    parser.add_argument("--refusals", choices=sorted(REFUSAL_SETS), default="plain")
    parser.add_argument(
        "--table-json", type=Path, help="with --measure: also write the table as JSON here"
    )
    arguments = parser.parse_args(argv)
    if (arguments.out is None) == (arguments.measure is None):
        parser.error("give exactly one of --out DIR (make a model) or --measure DIR")
    if arguments.hidden % min(32, arguments.hidden) or arguments.layers < 1:
        parser.error("--hidden must be a multiple of 32 (or below 32) and --layers at least 1")
    return arguments


def make(arguments: argparse.Namespace) -> None:
    started = time.perf_counter()
    out: Path = arguments.out
    split = build_split(
        arguments.seed,
        REFUSAL_SETS[arguments.refusals],
        HARMLESS_OPENINGS.get(arguments.refusals, ""),
    )
    prompt_folder = out / "prompts"
    prompt_folder.mkdir(parents=True, exist_ok=True)
    for name in PROMPT_FILES:
        kind, part = name.split("_")  # "harmful_train" -> ("harmful", "train")
        lines = split.prompts(part, harmful=kind == "harmful")
        (prompt_folder / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    tokenizer = train_tokenizer(split.train, arguments.vocab)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    end_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
    model = build_model(
        arguments.arch, arguments.hidden, arguments.layers, len(tokenizer), pad_id, end_id
    )
    frozen = frozen_layer_indices(arguments.refusal_depth, arguments.layers)
    for index in frozen:
        model.model.layers[index].requires_grad_(False)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(
        f"{arguments.arch}: {parameters / 1e6:.3f} M parameters, "
        f"{len(split.train)} train / {len(split.test)} test chats, "
        f"frozen layers {frozen or 'none'}",
        flush=True,
    )

    training_started = time.perf_counter()
    loss = train(
        model,
        encode_examples(tokenizer, split.train),
        pad_id,
        arguments.steps,
        arguments.batch_size,
        arguments.learning_rate,
        arguments.seed,
    )
    training_seconds = time.perf_counter() - training_started

    model.generation_config.eos_token_id = end_id
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved to {out} ({training_seconds:.1f} s training, final loss {loss:.4f})")
    model, tokenizer = load_model(out)
    rates = baseline_report(model, tokenizer, read_prompts(prompt_folder), arguments.max_new_tokens)
    settings = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in vars(arguments).items()
        if key not in {"measure", "table_json", "out"}
    }
    (out / "fixture.json").write_text(
        json.dumps(
            {
                "settings": settings,
                "frozen_layers": frozen,
                "parameters": parameters,
                "final_loss": round(loss, 5),
                "training_seconds": round(training_seconds, 1),
                "total_seconds": round(time.perf_counter() - started, 1),
                "refusal_rates": {name: round(rate, 4) for name, rate in rates.items()},
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    torch.set_num_threads(arguments.threads)
    torch.manual_seed(arguments.seed)
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    if arguments.measure is not None:
        if not (arguments.measure / "prompts").is_dir():
            print(f"error: {arguments.measure} has no prompts/ folder", file=sys.stderr)
            print("hint: give a folder this script made with --out", file=sys.stderr)
            return 2
        try:
            rows = measure(arguments.measure, arguments.max_new_tokens, arguments.direction_prompts)
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            print(f"error: cannot measure {arguments.measure}: {first_line}", file=sys.stderr)
            print("hint: give a folder this script made with --out", file=sys.stderr)
            return 2
        if arguments.table_json:
            arguments.table_json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        return 0
    make(arguments)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
