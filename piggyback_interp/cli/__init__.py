"""The ``piggyback`` command line: a thin layer over the library.

Example:
    $ piggyback demo --quick                                   # the main job, 3 minutes
    $ piggyback scan --finetuned runs/sft/finetune/adapter     # which template tokens carry it?
    $ piggyback finetune --config configs/recipes/qwen2.5-7b-treft.toml --data train.jsonl

Exit codes (docs/errors.md; the classes in :mod:`piggyback_interp.core.errors`): 0 success;
1 an unexpected error (a bug: the traceback is printed, please report it); 2 bad input
(a missing or malformed option, config file value, dataset or prompts file, a
``--device`` this machine lacks); 3 a model that cannot be loaded (missing, corrupt,
or a hub id while offline); 4 results cannot be written (disk full, read-only
``--out``); 5 a run folder that holds results of other inputs (use another ``--out``
or ``--overwrite``); 130 interrupted (finished steps are kept; run the same command
again to resume).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
import types
from collections.abc import Sequence
from pathlib import Path

from piggyback_interp.cli import (
    demo,
    evaluate,
    finetune,
    patch,
    perturb,
    report,
    reproduce,
    scan,
    sweep,
    task_vectors,
)
from piggyback_interp.cli import map as map_
from piggyback_interp.cli.options import apply_config_file, check_device, record_config
from piggyback_interp.core.errors import (
    EXIT_BUG,
    EXIT_DISK,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    DiskError,
    PiggybackError,
    disk_error,
)


class LazyParser(argparse.ArgumentParser):
    """A subcommand parser that adds its options (its module's ``add_options``, which may
    import torch) only when used, so ``piggyback --help`` and the other commands do not wait
    for them."""

    def __init__(self, *args, options=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pending = options

    def ensure_options(self) -> LazyParser:
        if self._pending is not None:
            add, self._pending = self._pending, None
            add(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        self.ensure_options()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.ensure_options()
        return super().format_help()

    def format_usage(self) -> str:
        self.ensure_options()
        return super().format_usage()


COMMANDS: tuple[types.ModuleType, ...] = (
    demo,
    finetune,
    evaluate,
    perturb,
    patch,
    sweep,
    task_vectors,
    scan,
    report,
    reproduce,
    map_,
)
"""Every subcommand, in the order ``piggyback --help`` lists them. A command is one module of
this package, named after it (``task_vectors`` is ``piggyback task-vectors``), holding
``HELP`` (its one line), ``RECORD`` (write ``<out>/config.json`` when it finished),
``add_options(parser)``, ``run(args) -> int`` (whose docstring is its page in the docs) and
optionally ``DESCRIPTION`` (its ``--help`` text, when longer than ``HELP``). Adding a command
is adding such a module and a line here. The modules import torch only inside their functions:
the options of a command are added when it is parsed (:class:`LazyParser`)."""


def command_name(module: types.ModuleType) -> str:
    """The command a module of :data:`COMMANDS` is: its name, ``-`` for ``_``."""
    return module.__name__.rpartition(".")[2].replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """The ``piggyback`` parser: one subcommand per module of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="piggyback",
        description="Find, patch and fix the chat-template tokens that carry finetuned behaviour.",
        epilog="Each command writes its results into --out; run it again to resume. "
        "Exit codes: 0 ok, 1 bug, 2 bad input, 3 model not loadable, 4 results not writable "
        "(disk full, read-only), 5 run folder holds other inputs, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=LazyParser
    )
    for module in COMMANDS:
        description = getattr(module, "DESCRIPTION", None)
        raw = {"formatter_class": argparse.RawDescriptionHelpFormatter} if description else {}
        p = sub.add_parser(
            command_name(module),
            help=module.HELP,
            description=description or module.HELP,
            options=module.add_options,
            **raw,
        )
        p.set_defaults(func=module.run, record=module.RECORD)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name].ensure_options()
    raise KeyError(name)


def _quiet_libraries() -> None:
    """No weight-loading progress bars or deprecation chatter from the libraries underneath."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("piggyback-interp")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def _error(command: str, message: str, code: int) -> int:
    print(f"piggyback {command}: error: {message}", file=sys.stderr)
    return code


def _bug(command: str) -> int:
    """An exception the toolkit did not raise on purpose: a bug, not the user's input."""
    traceback.print_exc()
    return _error(
        command,
        "an internal error (a bug, not your input): please report it with the traceback above, "
        f"the command and `piggyback --version` ({_version()})",
        EXIT_BUG,
    )


def _inside(path: str | None, folder: str | None) -> bool:
    if not path or not folder:
        return False
    path_, folder_ = Path(path).absolute(), Path(folder).absolute()
    return path_ == folder_ or folder_ in path_.parents


def _os_error(command: str, err: OSError, args: argparse.Namespace) -> int:
    """Exit 4 for results that cannot be written, 2 for an input that is missing or not
    readable, 1 (a bug) for anything else."""
    writing = err.errno in (errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", None)) or (
        err.errno in (errno.EACCES, errno.EPERM)
        and _inside(err.filename, getattr(args, "out", None))
    )
    disk = disk_error(err) if writing else None
    if disk is not None:
        return _error(command, str(disk), EXIT_DISK)
    if isinstance(err, (FileNotFoundError, PermissionError)):
        return _error(command, str(err), EXIT_INPUT)
    return _bug(command)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``piggyback``; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    # after parsing: --help does not wait for torch and TransformerLens
    _quiet_libraries()
    command = args.command
    try:
        if getattr(args, "config", None):
            apply_config_file(parser, _subparser(parser, command), args.config)
            args = parser.parse_args(argv)
        check_device(getattr(args, "device", None))
        if getattr(args, "device", None) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from piggyback_interp.core import distributed  # under torchrun / accelerate launch

            distributed.init_from_env(args.device)
        code = args.func(args)
        if code == EXIT_OK and args.record:
            record_config(args)
        return code
    except DiskError as err:  # a writer's errno, said with the fix
        return _error(command, str(disk_error(err) or err), EXIT_DISK)
    except PiggybackError as err:
        return _error(command, str(err), err.exit_code)
    except KeyboardInterrupt:
        print(
            f"\npiggyback {command}: interrupted; finished steps are kept in the run folder, "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except OSError as err:
        return _os_error(command, err, args)
    except Exception:
        return _bug(command)
