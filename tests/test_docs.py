"""The documentation site's generators (the site itself is built by `make docs`)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen_cli():
    return _load("gen_cli")


def test_every_subcommand_gets_a_page_with_its_help(gen_cli):
    from piggyback_interp.cli import build_parser

    parser = build_parser()
    pages = gen_cli.render_pages(parser)
    commands = list(gen_cli.walk(parser))
    assert commands, "build_parser() has no subcommands"
    assert {c.path for c in commands} | {"cli/index.md"} == set(pages)
    for command in commands:
        page = pages[command.path]
        assert f"usage: {command.parser.prog}" in page  # the full --help text
        assert f"# `{command.parser.prog}`" in page
        handler = command.parser.get_default("func")
        if handler is not None and handler.__doc__:
            first_line = handler.__doc__.strip().splitlines()[0]
            assert first_line in page  # the handler's docstring is the guide
        assert f"({command.path.removeprefix('cli/')})" in pages["cli/index.md"]


def test_nested_subcommands_and_aliases(gen_cli):
    def handler(args: argparse.Namespace) -> int:
        """Reproduce Table 5.

        Example:
            $ tool reproduce table5 --smoke
        """
        return 0

    parser = argparse.ArgumentParser(prog="tool", description="A tool.")
    sub = parser.add_subparsers(dest="command")
    reproduce = sub.add_parser("reproduce", help="reproduce a table", aliases=["rep"])
    tables = reproduce.add_subparsers(dest="table")
    table5 = tables.add_parser("table5", help="narrow settings | SFT vs TReFT")
    table5.add_argument("--smoke", action="store_true", help="x " * 80)
    table5.set_defaults(func=handler)

    pages = gen_cli.render_pages(parser)
    assert set(pages) == {"cli/index.md", "cli/reproduce.md", "cli/reproduce/table5.md"}
    page = pages["cli/reproduce/table5.md"]
    assert "usage: tool reproduce table5 [-h] [--smoke]" in page
    assert "```console\n$ tool reproduce table5 --smoke\n```" in page  # Example: as shell
    assert "Reproduce Table 5." in page
    assert "[`reproduce table5`](reproduce/table5.md)" in pages["cli/reproduce.md"]
    assert r"narrow settings \| SFT vs TReFT" in pages["cli/index.md"]
    help_lines = page.split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    assert max(map(len, help_lines)) <= int(gen_cli.HELP_COLUMNS)  # stable width
    nav = gen_cli.literate_nav(pages)
    assert "* reproduce\n    * [reproduce](reproduce.md)\n    * [reproduce table5]" in nav


def test_api_pages_cover_every_public_module():
    gen_api = _load("gen_api")
    modules = {m.name for m in gen_api.public_modules()}
    package = DOCS.parent / "piggyback_interp"
    for file in package.rglob("*.py"):
        parts = file.relative_to(package.parent).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if not any(p.startswith("_") for p in parts):
            assert ".".join(parts) in modules
    assert "piggyback_interp" in modules and "piggyback_interp.analysis.sweep" in modules
    assert not any(part.startswith("_") for m in modules for part in m.split("."))


def test_api_pages_document_lazy_exports_at_their_definitions():
    gen_api = _load("gen_api")
    pages = gen_api.render_pages()
    root = pages["api/piggyback_interp/index.md"]
    assert root.startswith("::: piggyback_interp\n")
    # a lazy (PEP 562) export of the top-level package links to its defining module
    assert "[`load_model`][piggyback_interp.core.models.load_model]" in root
    assert "[`ChatDataset`][piggyback_interp.core.data.chat.ChatDataset]" in root
    assert (
        pages["api/piggyback_interp/analysis/sweep.md"] == "::: piggyback_interp.analysis.sweep\n"
    )
    assert "* [piggyback_interp](piggyback_interp/index.md)" in pages["api/SUMMARY.md"]
