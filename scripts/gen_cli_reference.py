"""Write the parts of the documentation that the code already knows.

    python scripts/gen_cli_reference.py           # rewrite the generated files and sections
    python scripts/gen_cli_reference.py --check   # exit 1 if any of them is out of date

What it writes:

- `docs/commands.md`, whole: every command of `hctl` and `hctl-worker` with its `--help` text,
  read from the Typer/click command tree (plain click formatting, fixed width, no colour), so the
  reference cannot drift from the options that really exist.
- The settings tables in `docs/configuration.md`, read from the pydantic settings models of the
  controller (`hctl.settings.Settings`) and the worker (`hctl_worker.settings`).
- The event table in `docs/architecture.md`, read from `hctl_worker.events`.

Generated sections sit between `<!-- generated:NAME -->` and `<!-- end generated:NAME -->`; the
prose around them is written by hand and left alone. `tests/test_docs.py` regenerates everything in
memory and fails when a file differs.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import inspect
import re
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = REPO_ROOT / "docs"
COMMANDS_FILE = DOCS / "commands.md"
CONFIGURATION_FILE = DOCS / "configuration.md"
ARCHITECTURE_FILE = DOCS / "architecture.md"

# The command-line applications documented, as (program name, "module:attribute").
APPLICATIONS = (("hctl", "hctl.cli:app"), ("hctl-worker", "hctl_worker.cli:app"))

# A fixed width makes the help text the same on every machine and in every terminal.
HELP_WIDTH = 100

REGENERATE_HINT = "run `python scripts/gen_cli_reference.py` and commit the result"


def _prepare_environment() -> None:
    """Make the packages importable from a checkout that is not installed.

    Nothing else is changed here (no environment variables): the tests call this module inside
    the test session, and the help text is made terminal-independent by the fixed width of the
    click context and plain click formatting instead (see `render_help`).
    """
    for source in ("controller", "worker"):
        path = str(REPO_ROOT / source)
        if path not in sys.path:
            sys.path.insert(0, path)


# --- the command tree ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandEntry:
    """One command of an application: its words (`("hctl", "config", "set")`) and click object."""

    path: tuple[str, ...]
    command: object  # click.Command; typed loosely so importing this module stays cheap
    context: object  # click.Context, with its parents, so usage lines show the full command

    @property
    def name(self) -> str:
        return " ".join(self.path)


def load_command(program: str) -> object:
    """The click command behind one of the documented applications."""
    _prepare_environment()
    import typer.main

    spec = dict(APPLICATIONS)[program]
    module_name, attribute = spec.split(":")
    application = getattr(importlib.import_module(module_name), attribute)
    return typer.main.get_command(application)


def is_group(command: object) -> bool:
    """Whether a command has subcommands (Typer vendors its own click, so no isinstance)."""
    return hasattr(command, "list_commands") and hasattr(command, "get_command")


def make_context(command: object, name: str, parent: object | None) -> object:
    """A click context for `command` under `parent`, as `--help` would create it."""
    # Like `Command.make_context`, honour the command's own settings (e.g. `-h` as help option).
    settings = {
        **getattr(command, "context_settings", {}),
        "terminal_width": HELP_WIDTH,
        "max_content_width": HELP_WIDTH,
        "color": False,
    }
    return command.context_class(command, info_name=name, parent=parent, **settings)  # type: ignore[attr-defined]


def walk_commands(program: str) -> Iterator[CommandEntry]:
    """Every visible command of `program`, the root first, then depth-first in name order."""

    def visit(command: Any, path: tuple[str, ...], parent: Any) -> Iterator[CommandEntry]:
        context = make_context(command, path[-1], parent)
        yield CommandEntry(path, command, context)
        if is_group(command):
            for name in sorted(command.list_commands(context)):
                child = command.get_command(context, name)
                if child is None or child.hidden:
                    continue
                yield from visit(child, (*path, name), context)

    yield from visit(load_command(program), (program,), None)


def render_help(entry: CommandEntry) -> str:
    """The `--help` text of one command, in click's plain format."""
    command = entry.command
    # Typer formats help with rich unless a command's markup mode is None; plain click output is
    # stable across rich versions and terminals. The objects are fresh per call of
    # `typer.main.get_command`, so changing them here changes nothing for real use.
    if hasattr(command, "rich_markup_mode"):
        command.rich_markup_mode = None  # type: ignore[attr-defined]
    text = command.get_help(entry.context)  # type: ignore[attr-defined]
    return _normalise(text)


def _normalise(text: str) -> str:
    """Remove what depends on the machine: hctl's home folder, the user's, trailing spaces."""
    try:
        from hctl.settings import hctl_home

        text = text.replace(str(hctl_home()), "<hctl home>")
    except ImportError:  # the controller is not importable: nothing of it to replace
        pass
    home = str(Path.home())
    if len(home) > 1:
        text = text.replace(home, "~")
    return "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"


def _anchor(title: str) -> str:
    """The anchor GitHub gives a heading."""
    anchor = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
    return anchor


def _first_line(text: str | None) -> str:
    if not text:
        return ""
    return inspect.cleandoc(text).split("\n\n")[0].replace("\n", " ").strip()


def render_commands() -> str:
    """The whole of `docs/commands.md`."""
    sections: list[str] = []
    contents: list[str] = []
    for program, _ in APPLICATIONS:
        entries = list(walk_commands(program))
        contents.append(f"- **{program}**")
        for entry in entries:
            summary = _first_line(getattr(entry.command, "help", None))
            line = f"  - [{entry.name}](#{_anchor(entry.name)})"
            contents.append(f"{line} — {summary}" if summary else line)
        for entry in entries:
            sections.append(f"## {entry.name}\n\n```text\n{render_help(entry)}```\n")
    header = (
        "# Command reference\n\n"
        "<!-- Generated by scripts/gen_cli_reference.py from the code. Do not edit by hand. -->\n\n"
        "Every command of `hctl` (the laptop side) and `hctl-worker` (the GPU side), with the "
        "text its `--help` prints. This file is generated from the code by "
        "`python scripts/gen_cli_reference.py`, and a test fails when it is out of date, so "
        "every option below exists. Settings that have no option of their own are in "
        "[configuration.md](configuration.md).\n\n"
    )
    return header + "\n".join(contents) + "\n\n" + "\n".join(sections)


# --- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingRow:
    key: str  # the name in the config file (dotted for a TOML table)
    environment: str  # environment variable names, comma-separated; "" if none
    default: str
    meaning: str


def _format_value(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        if len(value) > 6:
            return f"{len(value)} entries"
        return "[" + ", ".join(_format_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else f"{len(value)} entries"
    if hasattr(value, "get_secret_value"):
        return "(secret)"
    return str(value)


def _literal_choices(annotation: object) -> list[object]:
    """The allowed values of a `Literal[...]` annotation (also inside `Optional`)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return list(typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        choices: list[object] = []
        for argument in typing.get_args(annotation):
            choices.extend(_literal_choices(argument))
        return choices
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [member.value for member in annotation]
    return []


def _constraints(field: object) -> str:
    words = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    parts = []
    for item in getattr(field, "metadata", []):
        for attribute, symbol in words.items():
            bound = getattr(item, attribute, None)
            if bound is not None:
                parts.append(f"{symbol} {bound}")
    return ", ".join(parts)


def _is_model(value: object) -> bool:
    from pydantic import BaseModel

    return isinstance(value, BaseModel)


def _inline_table(value: object) -> str:
    """A nested settings model as a TOML inline table of the values it sets."""
    items = value.model_dump(exclude_defaults=True)  # type: ignore[attr-defined]
    return "{" + ", ".join(f"{key} = {_format_value(item)}" for key, item in items.items()) + "}"


def toml_comments(path: Path) -> dict[str, str]:
    """The comment above each `key = value` of a documented TOML file, keyed by dotted name.

    `config.default.toml` explains every worker setting in comments; they are the meaning column
    when a field has no description of its own.
    """
    if not path.exists():
        return {}
    comments: dict[str, str] = {}
    table: tuple[str, ...] = ()
    pending: list[str] = []
    header = re.compile(r"\[([\w.\-]+)\]")
    assignment = re.compile(r"([A-Za-z_][\w\-]*)\s*=\s*\S.*")

    def attach(key: str) -> None:
        if pending:
            comments.setdefault(key, " ".join(pending))
        pending.clear()

    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        commented = line.startswith("#")
        body = line.lstrip("#").strip() if commented else line
        if not line:
            pending.clear()
        elif match := header.fullmatch(body):
            if not commented:
                table = tuple(match[1].split("."))
            attach(match[1])
        elif match := assignment.fullmatch(body):
            # A commented-out assignment documents an optional setting with no default value.
            attach(".".join((*table, match[1])))
        elif commented:
            pending.append(body)
        else:
            pending.clear()  # the rest of a multi-line value
    return comments


def _environment_names(
    name: str, field: object, prefix: str, nested_delimiter: str | None, parents: tuple[str, ...]
) -> list[str]:
    from pydantic import AliasChoices

    alias = getattr(field, "validation_alias", None)
    if isinstance(alias, AliasChoices):
        names = [choice for choice in alias.choices if isinstance(choice, str) and choice.isupper()]
        if names:
            return names
    if isinstance(alias, str) and alias.isupper():
        return [alias]
    if parents and not nested_delimiter:
        return []
    separator = nested_delimiter or "_"
    return [(prefix + separator.join((*parents, name))).upper()]


def settings_rows(
    model: type,
    *,
    prefix: str,
    nested_delimiter: str | None,
    comments: dict[str, str] | None = None,
) -> list[SettingRow]:
    """One row per setting of a pydantic settings model."""
    comments = comments or {}
    rows: list[SettingRow] = []
    unknown = object()  # no default to show
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        if field.default_factory is None and not field.is_required():
            value = field.default
        elif field.default_factory is not None:
            try:
                value = field.default_factory()
            except TypeError:  # a factory that needs the other values
                value = unknown
        else:
            value = unknown
        if value is unknown:
            default = "(required)" if field.default_factory is None else "(computed)"
        elif _is_model(value):
            default = f"`{_inline_table(value)}`"
        else:
            default = f"`{_format_value(value)}`"
        meaning = (field.description or comments.get(name) or "").strip()
        if not meaning and isinstance(field.annotation, type) and _is_model_class(field.annotation):
            meaning = _first_line(field.annotation.__doc__)
        choices = _literal_choices(field.annotation)
        if choices:
            meaning += (
                (" " if meaning else "")
                + "One of "
                + ", ".join(f"`{_format_value(choice)}`" for choice in choices)
            )
            meaning += "."
        bounds = _constraints(field)
        if bounds:
            meaning += (" " if meaning else "") + f"Range: {bounds}."
        environment = _environment_names(name, field, prefix, nested_delimiter, ())
        rows.append(
            SettingRow(
                key=name,
                environment=", ".join(f"`{variable}`" for variable in environment),
                default=default,
                meaning=meaning.replace("|", "\\|").replace("\n", " "),
            )
        )
    return rows


def _is_model_class(annotation: type) -> bool:
    from pydantic import BaseModel

    return issubclass(annotation, BaseModel)


def render_settings_table(rows: list[SettingRow]) -> str:
    lines = [
        "| setting | environment | default | meaning |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| `{row.key}` | {row.environment or '—'} | {row.default} | {row.meaning} |")
    return "\n".join(lines) + "\n"


def _settings_class(module_name: str, preferred: tuple[str, ...]) -> type | None:
    """The settings model of a module: a preferred name, else its one `BaseSettings` subclass."""
    from pydantic_settings import BaseSettings

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None
        raise
    for name in preferred:
        candidate = getattr(module, name, None)
        if isinstance(candidate, type) and issubclass(candidate, BaseSettings):
            return candidate
    found = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, BaseSettings)
        and value is not BaseSettings
        and value.__module__ == module.__name__
    ]
    return found[0] if len(found) == 1 else None


def render_settings(
    module_name: str, preferred: tuple[str, ...], comments_file: Path | None = None
) -> str:
    """The settings table of one settings module (or a line saying it does not exist yet)."""
    _prepare_environment()
    model = _settings_class(module_name, preferred)
    if model is None:
        return f"(`{module_name}` defines no settings model yet.)\n"
    config = model.model_config  # type: ignore[attr-defined]
    rows = settings_rows(
        model,
        prefix=config.get("env_prefix") or "",
        nested_delimiter=config.get("env_nested_delimiter"),
        comments=toml_comments(comments_file) if comments_file else None,
    )
    return render_settings_table(rows)


# --- events -------------------------------------------------------------------------------------


def render_events() -> str:
    """The event types of the worker's protocol, with their fields."""
    _prepare_environment()
    from hctl_worker import events

    union = typing.get_args(events.Event)[0]
    common = set(events._Event.model_fields)
    lines = ["| type | what it says | fields (besides `v`, `ts`, `seq`) |", "|---|---|---|"]
    for event_class in typing.get_args(union):
        type_name = event_class.model_fields["type"].default
        fields = ", ".join(
            f"`{name}`"
            for name, field in event_class.model_fields.items()
            if name not in common | {"type"} and not field.exclude  # excluded: never on the wire
        )
        summary = _first_line(event_class.__doc__) or "—"
        lines.append(f"| `{type_name}` | {summary} | {fields} |")
    return "\n".join(lines) + "\n"


# --- generated sections -------------------------------------------------------------------------


def generated_sections() -> dict[Path, dict[str, str]]:
    """For each hand-written file, the content of each of its generated sections."""
    return {
        CONFIGURATION_FILE: {
            "controller-settings": render_settings("hctl.settings", ("Settings",)),
            "worker-settings": render_settings(
                "hctl_worker.settings",
                ("Settings", "WorkerSettings"),
                REPO_ROOT / "worker" / "hctl_worker" / "config.default.toml",
            ),
        },
        ARCHITECTURE_FILE: {"event-types": render_events()},
    }


def _section_pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- generated:{re.escape(name)} -->\n)(.*?)(<!-- end generated:{re.escape(name)} -->)",
        re.DOTALL,
    )


def fill_sections(text: str, sections: dict[str, str], *, file_name: str) -> str:
    """`text` with each generated section replaced; a missing marker is an error."""
    for name, content in sections.items():
        pattern = _section_pattern(name)
        if not pattern.search(text):
            raise SystemExit(
                f"error: {file_name} has no '<!-- generated:{name} -->' ... "
                f"'<!-- end generated:{name} -->' markers; add them where the table belongs."
            )
        text = pattern.sub(lambda match, body=content: match[1] + body + match[3], text)
    return text


def expected_files() -> dict[Path, str]:
    """Every generated file or section as it should be, keyed by file."""
    files = {COMMANDS_FILE: render_commands()}
    for path, sections in generated_sections().items():
        current = path.read_text(encoding="utf-8")
        files[path] = fill_sections(current, sections, file_name=path.name)
    return files


def stale_files() -> list[Path]:
    """The files whose generated content differs from what the code says now."""
    stale = []
    for path, expected in expected_files().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != expected:
            stale.append(path)
    return stale


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="only report files that are out of date (exit 1)"
    )
    arguments = parser.parse_args(argv)
    if arguments.check:
        stale = stale_files()
        for path in stale:
            print(f"out of date: {_shown(path)}; {REGENERATE_HINT}")
        return 1 if stale else 0
    for path, expected in expected_files().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != expected:
            path.write_text(expected, encoding="utf-8", newline="\n")
            print(f"wrote {_shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
