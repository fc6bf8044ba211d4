"""Build (once, into the fixture cache) a tiny model that complies in one fixed opening.

It is the model built to break the worker's learned refusal markers (hctl_worker.baseline_check):
it refuses nothing, but answers every harmful request "Sure, here is how to <task>: ..." and every
harmless one "Certainly! ...". Its harmful replies then share an opening that no harmless reply
contains, as a refusal's do; a worker that learned that opening as a refusal would search to
remove compliance. Trained on the CPU by scripts/make_tiny_refuser.py (`--refusals compliant`)
in a few minutes, so it is not committed: it is built into `$HCTL_FIXTURE_CACHE` (else
~/.cache/hctl/fixtures) under a folder named by a hash of its recipe, the code that builds it and
the library versions (scripts/fixture_cache.py: a lock, a staging folder, one rename).

    python scripts/make_compliant_model.py --print-path
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_cache import cache_root, exclusive_lock, publish, staging_folder  # noqa: E402

HERE = Path(__file__).resolve().parent
# The recipe: make_tiny_refuser.py's defaults (4 layers, hidden 128, 300 steps), a Llama, and
# the compliant replies instead of refusals.
RECIPE = ("--arch", "llama", "--refusals", "compliant", "--threads", "1", "--seed", "0")
SOURCES = ("make_tiny_refuser.py", "tiny_refuser_data.py", "fixture_training.py")
FOLDER_NAME = "tiny-compliant"


def build_key() -> str:
    """A hash of the recipe, the code that builds the model and the libraries it is built with."""
    digest = hashlib.sha256(" ".join(RECIPE).encode())
    for name in SOURCES:
        digest.update((HERE / name).read_bytes())
    for package in ("torch", "transformers", "tokenizers"):
        digest.update(f"{package}={importlib.metadata.version(package)}".encode())
    return digest.hexdigest()[:16]


def ensure_built(root: Path | None = None) -> Path:
    """The model's folder, trained first if this recipe has not been built yet."""
    root = root or cache_root()
    folder = root / f"{FOLDER_NAME}-{build_key()}"
    if (folder / "fixture.json").is_file():  # written last by make_tiny_refuser
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / f".{folder.name}.lock"):
        if not (folder / "fixture.json").is_file():
            import make_tiny_refuser

            with staging_folder(root) as staging:
                built = staging / FOLDER_NAME
                make_tiny_refuser.main(["--out", str(built), *RECIPE])
                publish(built, folder)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print-path", action="store_true", help="print the model's folder")
    arguments = parser.parse_args(argv)
    try:
        folder = ensure_built()
    except OSError as error:
        print(f"error: cannot build into {cache_root()}: {error}", file=sys.stderr)
        print("hint: set HCTL_FIXTURE_CACHE to a writable folder", file=sys.stderr)
        return 2
    if arguments.print_path:
        print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
