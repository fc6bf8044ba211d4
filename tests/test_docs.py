"""The documentation says only what the code does.

- The generated reference (docs/commands.md, the settings tables, the event table) is current.
- Every `hctl ...` / `hctl-worker ...` command line in the docs and the README names a command
  that exists and uses only options that command has.
- Every script or file path the docs tell people to run or open exists.
- The troubleshooting guide covers every problem in the owner's notes, and every runpod.ps1
  command has an hctl equivalent.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = REPO_ROOT / "docs"
PROGRAMS = ("hctl", "hctl-worker")


def _load_generator() -> ModuleType:
    path = REPO_ROOT / "scripts" / "gen_cli_reference.py"
    spec = importlib.util.spec_from_file_location("gen_cli_reference", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


generator_module = _load_generator()


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    return generator_module


def documentation_files() -> list[Path]:
    files = sorted(DOCS.glob("*.md")) + [REPO_ROOT / "README.md"]
    files += sorted((REPO_ROOT / "images").glob("*.md"))
    return [path for path in files if path.exists()]


# --- the generated reference --------------------------------------------------------------------


def test_generated_reference_is_current(generator: ModuleType) -> None:
    problems = []
    for path, expected in generator.expected_files().items():
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != expected:
            diff = difflib.unified_diff(
                current.splitlines(),
                expected.splitlines(),
                "in the file",
                "from the code",
                lineterm="",
                n=1,
            )
            excerpt = "\n".join(list(diff)[:30])
            problems.append(f"{path.relative_to(REPO_ROOT)} is out of date:\n{excerpt}")
    assert not problems, (
        "\n\n".join(problems)
        + "\n\nRun `python scripts/gen_cli_reference.py` and commit the result."
    )


def test_generator_check_mode_reports_a_stale_file(
    generator: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = tmp_path / "commands.md"
    stale.write_text("# Command reference\n\nhctl frobnicate --now\n", encoding="utf-8")
    monkeypatch.setattr(generator, "COMMANDS_FILE", stale)
    assert stale in generator.stale_files()
    assert generator.main(["--check"]) == 1


def test_generated_sections_need_their_markers(generator: ModuleType) -> None:
    with pytest.raises(SystemExit, match="generated:table"):
        generator.fill_sections("no markers here\n", {"table": "x\n"}, file_name="some.md")
    filled = generator.fill_sections(
        "a\n<!-- generated:table -->\nold\n<!-- end generated:table -->\nb\n",
        {"table": "new\n"},
        file_name="some.md",
    )
    assert filled == "a\n<!-- generated:table -->\nnew\n<!-- end generated:table -->\nb\n"


# --- command lines in the docs ------------------------------------------------------------------


@dataclass(frozen=True)
class CommandLine:
    file: Path
    line: int
    text: str

    def where(self) -> str:
        return f"{self.file.relative_to(REPO_ROOT)}:{self.line}: {self.text}"


_PROMPT = re.compile(r"^(?:\$|>|%|PS [^>]*>|PS>|C:\\[^>]*>)\s+")
_INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def _code_lines(path: Path) -> Iterator[CommandLine]:
    """Lines of fenced code blocks (continuations joined) and inline code spans."""
    in_block = False
    pending = ""
    pending_start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            in_block = not in_block
            pending = ""
            continue
        if in_block:
            line = _PROMPT.sub("", stripped)
            if not pending:
                pending_start = number
            # bash `\`, PowerShell backtick and cmd `^` continue a command on the next line.
            if line.endswith(("\\", "`", "^")):
                pending += line[:-1] + " "
                continue
            yield CommandLine(path, pending_start, pending + line)
            pending = ""
        else:
            for match in _INLINE_CODE.finditer(raw):
                yield CommandLine(path, number, match[1].strip())


def _simple_commands(text: str) -> Iterator[list[str]]:
    """The simple commands of a shell line: split at `&&`, `||`, `;`, `|`; comments dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes (PowerShell, prose): fall back to plain words
        tokens = text.split()
    command: list[str] = []
    for token in tokens:
        if token and set(token) <= set(";&|"):
            if command:
                yield command
            command = []
        else:
            command.append(token)
    if command:
        yield command


def _program(word: str) -> str | None:
    name = re.split(r"[\\/]", word)[-1].removesuffix(".exe")
    return name if name in PROGRAMS else None


def documented_command_lines() -> Iterator[tuple[CommandLine, list[str]]]:
    """Every hctl / hctl-worker invocation in the docs, with its words."""
    for path in documentation_files():
        for code in _code_lines(path):
            for words in _simple_commands(code.text):
                while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                    words = words[1:]  # NAME=value before the command
                if words and _program(words[0]):
                    yield code, words


# Typer vendors its own copy of click, so commands and parameters are used by their attributes.
Command = Any


def _options(command: Command, context: Any) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for parameter in command.get_params(context):
        if parameter.param_type_name == "option":
            for name in (*parameter.opts, *parameter.secondary_opts):
                options[name] = parameter
    return options


def check_command_line(words: list[str], roots: dict[str, Command]) -> str | None:
    """Why this invocation would fail to parse, or None when its commands and options exist."""
    program = _program(words[0])
    assert program is not None
    command = roots[program]
    context = generator_module.make_context(command, program, None)
    path = [program]
    index = 1
    while index < len(words):
        # Placeholders such as `[--gpu GPU]` or `...` are written around real words.
        word = words[index].strip("[]")
        index += 1
        if word in {"", "..."}:
            continue
        if word == "--":
            break  # what follows belongs to the remote command (`hctl exec POD -- nvidia-smi`)
        if word.startswith("-") and len(word) > 1:
            name, has_value, _ = word.partition("=")
            parameter = _options(command, context).get(name)
            if parameter is None:
                return f"`{' '.join(path)}` has no option {name}"
            takes_value = not (parameter.is_flag or parameter.count)
            if takes_value and not has_value:
                index += max(parameter.nargs, 1)
            continue
        if generator_module.is_group(command):
            subcommand = command.get_command(context, word)
            if subcommand is None:
                return f"`{' '.join(path)}` has no command `{word}`"
            command = subcommand
            context = generator_module.make_context(command, word, context)
            path.append(word)
        # Otherwise a positional argument: MODEL, POD, a path... nothing to check.
    return None


@pytest.fixture(scope="module")
def command_roots(generator: ModuleType) -> dict[str, Command]:
    return {program: generator.load_command(program) for program in PROGRAMS}


def test_command_checker_catches_unknown_commands_and_options(
    command_roots: dict[str, Command],
) -> None:
    assert check_command_line(["hctl", "--help"], command_roots) is None
    assert "no command `frobnicate`" in check_command_line(["hctl", "frobnicate"], command_roots)
    assert "no option --frobnicate" in check_command_line(["hctl", "--frobnicate"], command_roots)
    lines = list(_simple_commands("X=1 hctl --version && hctl-worker --help # comment"))
    assert lines == [["X=1", "hctl", "--version"], ["hctl-worker", "--help"]]


def test_every_documented_command_line_exists(command_roots: dict[str, Command]) -> None:
    problems = []
    seen = 0
    for code, words in documented_command_lines():
        seen += 1
        problem = check_command_line(words, command_roots)
        if problem:
            problems.append(f"{code.where()}\n    -> {problem}")
    assert seen > 0, "the docs show no hctl command at all"
    assert not problems, (
        "These documented command lines do not match the code (see `hctl ... --help`):\n"
        + "\n".join(problems)
    )


# --- files and scripts the docs point to --------------------------------------------------------

_REPOSITORY_PATH = re.compile(
    r"(?<![\w/.-])((?:scripts|tests|images|docs|controller|worker)/[\w./-]*[\w-])"
)


def test_every_repository_path_in_the_docs_exists() -> None:
    missing = []
    for path in documentation_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for match in _REPOSITORY_PATH.finditer(line):
                mentioned = match[1].rstrip(".")
                if "*" in mentioned or "<" in mentioned:
                    continue
                if not (REPO_ROOT / mentioned).exists():
                    missing.append(f"{path.relative_to(REPO_ROOT)}:{number}: {mentioned}")
    assert not missing, "The docs mention files that do not exist:\n" + "\n".join(missing)


# --- troubleshooting and migration --------------------------------------------------------------

# Each problem of the owner's notes, as the words a user sees (any one of them must be quoted).
OWNER_PROBLEMS = {
    "no space left": ("No space left on device",),
    "CUDA out of memory": ("CUDA out of memory",),
    "missing architecture": ("Could not find Qwen3ForCausalLM",),
    "PTY refused": ("Your SSH client doesn't support PTY",),
    "container not found": ("container not found",),
    "connection refused on direct TCP": ("Connection refused",),
    "GPU memory held by other processes": ("other processes",),
}

# Every command of the old runpod.ps1 (from the owner's notes).
RUNPOD_PS1_COMMANDS = (
    "create-pod",
    "list-pods",
    "stop-pod",
    "start-pod",
    "terminate-pod",
    "gpus",
    "setup",
    "test",
    "run",
    "exec",
    "status",
    "connect",
    "monitor",
    "check-tools",
    "install-runpodctl",
)


def test_troubleshooting_covers_every_problem_of_the_owners_notes() -> None:
    text = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    headings = [line for line in text.splitlines() if line.startswith("#")]
    missing = [
        problem
        for problem, phrases in OWNER_PROBLEMS.items()
        if not any(phrase.lower() in " ".join(headings).lower() for phrase in phrases)
    ]
    assert not missing, f"docs/troubleshooting.md has no section for: {', '.join(missing)}"


def test_every_runpod_ps1_command_has_an_hctl_equivalent() -> None:
    text = (DOCS / "migrating-from-runpod-ps1.md").read_text(encoding="utf-8")
    mapped: dict[str, str] = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2:
            continue
        old = re.search(r"runpod\.ps1\s+([\w-]+)", cells[0])
        if old:
            mapped[old[1]] = cells[1]
    missing = [command for command in RUNPOD_PS1_COMMANDS if command not in mapped]
    assert not missing, f"no row for runpod.ps1 {', '.join(missing)}"
    without_hctl = [old for old, new in mapped.items() if "`hctl" not in new]
    assert not without_hctl, f"rows without an hctl command: {', '.join(without_hctl)}"


# --- settings named in the docs -----------------------------------------------------------------


def _environment_names(module_name: str, class_names: tuple[str, ...]) -> set[str]:
    model = generator_module._settings_class(module_name, class_names)
    if model is None:
        return set()
    prefix = model.model_config.get("env_prefix") or ""
    names = set()
    for row in generator_module.settings_rows(model, prefix=prefix, nested_delimiter=None):
        names.update(re.findall(r"`([A-Z0-9_]+)`", row.environment))
    return names


def test_every_environment_variable_in_the_docs_is_a_setting() -> None:
    known = _environment_names("hctl.settings", ("Settings",))
    known |= _environment_names("hctl_worker.settings", ("Settings", "WorkerSettings"))
    # HCTL_HOME is read before the settings (it says where the config file is); HCTL_VERSION is
    # the pod image's build argument.
    known |= {"HCTL_HOME", "HCTL_VERSION"}
    unknown = []
    for path in documentation_files():
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"\b((?:HCTL|HERETIC)_[A-Z0-9_]*[A-Z0-9])\b", text):
            if match[1] not in known:
                line = text.count("\n", 0, match.start()) + 1
                unknown.append(f"{path.relative_to(REPO_ROOT)}:{line}: {match[1]}")
    assert not unknown, "The docs name environment variables no setting reads:\n" + "\n".join(
        unknown
    )


def test_every_config_key_in_the_docs_is_a_controller_setting() -> None:
    from hctl.settings import Settings

    unknown = []
    for code, words in documented_command_lines():
        key = words[3] if words[1:3] == ["config", "set"] and len(words) > 3 else None
        # An upper-case word (KEY) is a placeholder.
        if key and key not in Settings.model_fields and key.upper() != key:
            unknown.append(f"{code.where()} -> no setting `{words[3]}`")
    assert not unknown, "\n".join(unknown)


# --- developer scripts named in the docs --------------------------------------------------------


def test_every_documented_script_option_exists() -> None:
    """`python scripts/X.py --option` in the docs: the script exists and defines that option."""
    problems = []
    for path in documentation_files():
        for code in _code_lines(path):
            for words in _simple_commands(code.text):
                if len(words) < 2 or not re.fullmatch(r"python3?(\.exe)?", words[0]):
                    continue
                script = REPO_ROOT / words[1]
                if not words[1].startswith("scripts/"):
                    continue
                if not script.exists():
                    problems.append(f"{code.where()}\n    -> {words[1]} does not exist")
                    continue
                source = script.read_text(encoding="utf-8")
                for word in words[2:]:
                    option = word.partition("=")[0]
                    if option.startswith("--") and f'"{option}"' not in source:
                        problems.append(f"{code.where()}\n    -> {words[1]} has no {option}")
    assert not problems, "\n".join(problems)


def test_every_job_directory_file_is_documented() -> None:
    """The job directory's file names (constants in the code) all appear in architecture.md."""
    from hctl_worker import events

    names = {
        value
        for name, value in vars(events).items()
        if name.endswith(("_FILE", "_DIR")) and isinstance(value, str)
    }
    for module_name in (
        "hctl.services.follow",
        "hctl.services.launch",
        "hctl.services.jobs",
        "hctl.services.job_protocol",
    ):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        names |= {
            value
            for name, value in vars(module).items()
            if name.endswith("_FILE") and isinstance(value, str) and "/" not in value
        }
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    missing = sorted(name for name in names if f"`{name}" not in text)
    assert not missing, f"docs/architecture.md does not describe: {', '.join(missing)}"


def test_image_tags_in_the_docs_are_the_project_version() -> None:
    """`USER/hctl-worker:VERSION` examples follow the version, as the image's label does."""
    import hctl

    stale = []
    for path in [*documentation_files(), REPO_ROOT / "images" / "Dockerfile"]:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"hctl-worker:(\d+\.\d+\.\d+\S*)", text):
            if match[1].rstrip(".,)`") != hctl.__version__:
                stale.append(f"{path.relative_to(REPO_ROOT)}: {match[0]}")
    assert not stale, f"Image tags other than {hctl.__version__}:\n" + "\n".join(stale)


def test_code_fences_are_well_formed() -> None:
    """Every fence opens with an optional language and closes alone on its line."""
    problems = []
    for path in documentation_files():
        opened = 0
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            stripped = line.strip()
            if not stripped.startswith("```"):
                continue
            if not re.fullmatch(r"```[\w+-]*", stripped):
                problems.append(f"{path.relative_to(REPO_ROOT)}:{number}: {stripped}")
            opened = 0 if opened else number
        if opened:
            problems.append(f"{path.relative_to(REPO_ROOT)}:{opened}: fence never closed")
    assert not problems, "Malformed code fences:\n" + "\n".join(problems)
