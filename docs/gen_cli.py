"""Generate the CLI reference (``cli/*.md``) from ``piggyback_interp.cli.build_parser()``.

Run by mkdocs-gen-files at build time (see ``mkdocs.yml``); nothing here is written to
``docs/``. Every subcommand the parser has, at any depth (``piggyback reproduce``, and
``piggyback a b`` for a nested subparser), gets a page ``cli/<words>.md`` with its
handler's docstring (the ``func`` default the subparser sets; the hand-written guide
of that command) and its full ``--help`` text. ``cli/index.md`` lists the commands
with their one-line help. A subcommand added to ``cli.py`` appears without any change
here.

:func:`render_pages` is pure (``{path: markdown}``) so a test can check it without
mkdocs.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import re
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

HELP_COLUMNS = "80"  # argparse wraps --help to the terminal width: pin it (fits the page)
_SECTION = re.compile(r"^(Examples?|Usage|Notes?|Output|Outputs|See also):\s*$")


@dataclass(frozen=True)
class Command:
    """One (sub)command: its words after the program name, parser and one-line help."""

    words: tuple[str, ...]
    parser: argparse.ArgumentParser
    help: str | None

    @property
    def path(self) -> str:
        """The page of this command, relative to the docs root."""
        return "cli/" + "/".join(self.words) + ".md"

    @property
    def handler(self) -> object | None:
        """The function ``set_defaults(func=...)`` gave this subparser, if any."""
        return self.parser.get_default("func")


def _subparser_actions(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def walk(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> Iterator[Command]:
    """Every subcommand of ``parser``, depth first, in the order they were added."""
    for action in _subparser_actions(parser):
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        seen: set[int] = set()
        for name, sub in action.choices.items():
            if id(sub) in seen:  # an alias of a command already listed
                continue
            seen.add(id(sub))
            command = Command((*words, name), sub, helps.get(name))
            yield command
            yield from walk(sub, command.words)


@contextlib.contextmanager
def _help_width(columns: str = HELP_COLUMNS) -> Iterator[None]:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = columns
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def docstring_markdown(doc: str) -> str:
    """A handler docstring as markdown.

    The docstring is written as markdown. The one accommodation is for Google-style
    sections (``Example:``, ``Usage:``, ...) whose body is indented: that body is
    shell text and becomes a fenced ``console`` block, as it reads in a terminal.
    """
    lines = doc.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _SECTION.match(lines[i])
        body_start = i + 1
        if match and body_start < len(lines) and lines[body_start].startswith((" ", "\t")):
            end = body_start
            while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end]):
                end += 1
            body = textwrap.dedent("\n".join(lines[body_start:end])).strip("\n")
            out += [f"**{match.group(1)}:**", "", "```console", body, "```", ""]
            i = end
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out).strip() + "\n"


def _command_page(prog: str, command: Command) -> str:
    title = " ".join((prog, *command.words))
    parts = [f"# `{title}`", ""]
    if command.help:
        parts += [f"*{command.help.strip()}*", ""]
    handler = command.handler
    doc = inspect.getdoc(handler) if handler is not None else None
    if doc is None and command.parser.description:
        doc = command.parser.description
    if doc:
        parts += [docstring_markdown(doc), ""]
    subcommands = list(walk(command.parser, command.words))
    if subcommands:
        parts += ["## Subcommands", "", _command_table(subcommands, relative_to=command), ""]
    parts += ["## Usage", "", "```text", command.parser.format_help().rstrip(), "```", ""]
    if handler is not None:
        name = f"{handler.__module__}.{handler.__qualname__}"
        parts += [f"Handler: `{name}`.", ""]
    return "\n".join(parts)


def _link(command: Command, relative_to: Command | None) -> str:
    target = command.path.removeprefix("cli/")
    if relative_to is not None:  # pages of a nested command sit in a folder of that name
        depth = len(relative_to.words) - 1
        target = "../" * depth + target
    return target


def _command_table(commands: list[Command], relative_to: Command | None = None) -> str:
    rows = ["| command | what it does |", "| --- | --- |"]
    for command in commands:
        help_text = (command.help or "").replace("|", r"\|").strip()
        label = " ".join(command.words)
        rows.append(f"| [`{label}`]({_link(command, relative_to)}) | {help_text} |")
    return "\n".join(rows)


def render_pages(parser: argparse.ArgumentParser, guide: str | None = None) -> dict[str, str]:
    """``{path: markdown}``: ``cli/index.md`` and one page per (nested) subcommand.

    ``guide`` (the CLI module's docstring) opens the index page.
    """
    with _help_width():
        commands = list(walk(parser))
        prog = parser.prog
        pages = {command.path: _command_page(prog, command) for command in commands}
        index = [
            "# Command line",
            "",
            f"`{prog}` is installed with the package (`pip install -e .`); "
            f"`python -m piggyback_interp.cli` is the same program. "
            "These pages are generated from the parser and the command handlers at every "
            "documentation build, so they list exactly the commands the code has.",
            "",
        ]
        if guide:
            index += [docstring_markdown(guide), ""]
        elif parser.description:
            index += [parser.description.strip(), ""]
        index += ["## Commands", "", _command_table(commands), ""]
        index += ["## Usage", "", "```text", parser.format_help().rstrip(), "```", ""]
    pages["cli/index.md"] = "\n".join(index)
    return pages


def literate_nav(pages: dict[str, str]) -> str:
    """A mkdocs-literate-nav ``SUMMARY.md`` for the pages.

    A command with subcommands becomes a section holding its own page and theirs.
    """
    commands = [
        tuple(p.removeprefix("cli/").removesuffix(".md").split("/"))
        for p in pages
        if p != "cli/index.md"
    ]
    parents = {c[:n] for c in commands for n in range(1, len(c))}
    lines = ["* [Overview](index.md)"]
    for words in commands:
        depth = len(words) - 1
        link = f"[{' '.join(words)}]({'/'.join(words)}.md)"
        if words in parents:
            lines.append(f"{'    ' * depth}* {' '.join(words)}")
            lines.append(f"{'    ' * (depth + 1)}* {link}")
        else:
            lines.append(f"{'    ' * depth}* {link}")
    return "\n".join(lines) + "\n"


def main() -> None:
    import mkdocs_gen_files

    from piggyback_interp.cli import build_parser

    module = sys.modules[build_parser.__module__]
    pages = render_pages(build_parser(), guide=inspect.getdoc(module))
    for path, text in pages.items():
        with mkdocs_gen_files.open(path, "w") as f:
            f.write(text)
    with mkdocs_gen_files.open("cli/SUMMARY.md", "w") as f:
        f.write(literate_nav(pages))


if __name__ in {"__main__", "<run_path>"}:  # mkdocs-gen-files runs scripts via runpy
    main()
