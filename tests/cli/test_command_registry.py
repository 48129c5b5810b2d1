"""The command registry (``piggyback_interp.cli.COMMANDS``): one module per command.

Each command module holds its help, its options and its handler; the parser is built from
the registry alone, so ``piggyback --help`` lists exactly the registered modules.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import piggyback_interp.cli as cli
from piggyback_interp.cli import COMMANDS, build_parser, command_name, main

NOT_COMMANDS = {"__init__", "__main__", "common", "options"}  # the machinery, not commands


@pytest.mark.parametrize("module", COMMANDS, ids=command_name)
def test_every_command_module_has_help_options_and_a_handler(module):
    assert isinstance(module.HELP, str) and module.HELP.strip()
    assert isinstance(module.RECORD, bool)
    assert list(inspect.signature(module.add_options).parameters) == ["p"]
    assert list(inspect.signature(module.run).parameters) == ["args"]
    assert inspect.signature(module.run).return_annotation in (int, "int")


def test_every_module_of_the_cli_package_is_a_registered_command():
    """A command module left out of the registry would be dead code, not a command."""
    folder = Path(cli.__file__).parent
    modules = {path.stem for path in folder.glob("*.py")} - NOT_COMMANDS
    assert modules == {module.__name__.rpartition(".")[2] for module in COMMANDS}
    assert command_name(cli.task_vectors) == "task-vectors"


def test_the_parser_is_the_registry():
    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    assert list(sub.choices) == [command_name(m) for m in COMMANDS]
    for module in COMMANDS:
        parser = sub.choices[command_name(module)]
        assert parser.get_default("func") is module.run
        assert parser.get_default("record") is module.RECORD
        assert parser.description == getattr(module, "DESCRIPTION", module.HELP)


def test_help_lists_the_registered_commands_in_order():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    listed = re.findall(r"^ {4}(\S+)\s", out.getvalue().split("COMMAND\n", 1)[1], re.M)
    assert listed == [command_name(m) for m in COMMANDS]
    for module in COMMANDS:
        assert module.HELP[:40] in " ".join(out.getvalue().split())


def test_help_does_not_import_torch():
    """The command modules import torch, TransformerLens and transformers only in their
    functions, and a command's options are added only when it is used: ``piggyback --help``
    and a light command's ``--help`` start at once."""
    code = (
        "import sys\n"
        "from piggyback_interp.cli import main\n"
        "for argv in (['--help'], ['report', '--help'], ['demo', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('torch', 'transformer_lens', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
