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
from collections.abc import Sequence
from pathlib import Path

from piggyback_interp.cli import commands, map_command
from piggyback_interp.cli.options import (
    add_common,
    add_config,
    add_dataclass,
    add_device,
    add_pair,
    add_prompts,
    apply_config_file,
    check_device,
    record_config,
)
from piggyback_interp.core.embedded import EMBEDDED_NAME
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
    """A subcommand parser that adds its dataclass options (which import torch) only when used,
    so ``piggyback --help`` and the other commands do not wait for them."""

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


def _scan_options(p: argparse.ArgumentParser) -> None:
    from piggyback_interp.experiments.scan_config import TEMPLATE_SEGMENTS, ScanConfig

    add_pair(p)
    add_prompts(p, n=8)
    add_device(p)
    add_dataclass(p, ScanConfig, choices={"segments": TEMPLATE_SEGMENTS})
    p.add_argument("--overwrite", action="store_true", help="redo steps run with other inputs")


def _finetune_options(p: argparse.ArgumentParser) -> None:
    from piggyback_interp.training import FinetuneConfig

    p.add_argument(
        "--model", default=EMBEDDED_NAME, help="model to finetune (default: %(default)s)"
    )
    p.add_argument("--data", metavar="FILE", help="training chats: messages-format JSONL")
    p.add_argument("--setting", help="or a shipped narrow setting: abstention, refusal, ...")
    p.add_argument("--retain", metavar="FILE", help="aligned chats for interleave / kl_retain")
    add_device(p, placement=False)
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun / accelerate launch: shard weights, gradients and optimizer state "
        "over the processes (FSDP2) instead of a whole copy in each; same result",
    )
    p.add_argument("--overwrite", action="store_true", help="redo a finetune run with other inputs")
    add_dataclass(p, FinetuneConfig, defaults={"export": "adapter"})


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=EMBEDDED_NAME, help="model to evaluate (default: %(default)s)"
    )
    p.add_argument("--setting", default="abstention", help="shipped setting (default: %(default)s)")
    p.add_argument("--data", metavar="FILE", help="or your own chat JSONL (one fixed response)")
    p.add_argument("--patch-base", metavar="MODEL", help="answer under this model's prefix K/V")
    p.add_argument("--limit", type=int, help="questions per split (default: all)")
    p.add_argument("--max-new-tokens", type=int, help="default: the setting's")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="prompts per generation batch (default: %(default)s)",
    )
    add_device(p)
    p.add_argument("--overwrite", action="store_true", help="redo an evaluation with other inputs")


def build_parser() -> argparse.ArgumentParser:
    """The ``piggyback`` parser: one subcommand per concept of the toolkit."""
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

    def command(name: str, func, help: str, out: str, options=None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, options=options)
        if out:
            add_common(p, out=out)
        # record: write <out>/config.json when the command finished
        p.set_defaults(func=func, record=bool(out))
        return p

    p = command("demo", commands.demo, "run the main job on the embedded model", "")
    p.add_argument("--quick", action="store_true", help="under 3 minutes: fewer examples, layers")
    p.add_argument("--out", help="run folder (default: runs/demo, or runs/demo-quick)")
    add_config(p)
    p.add_argument("--model", default=EMBEDDED_NAME, help="chat model (default: %(default)s)")
    p.add_argument("--setting", default="abstention", help="narrow setting (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="redo steps run with other inputs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(record=True)

    command(
        "finetune",
        commands.finetune,
        "finetune with SFT, TReFT or a baseline",
        "runs/finetune",
        _finetune_options,
    )
    command(
        "evaluate",
        commands.evaluate,
        "measure on- and off-topic behaviour",
        "runs/evaluate",
        _evaluate_options,
    )
    command(
        "perturb",
        commands.perturb,
        "perturb template segments vs the query",
        "runs/scan",
        _scan_options,
    )
    command(
        "patch",
        commands.patch,
        "patch base prefix/postfix K/V, with controls",
        "runs/scan",
        _scan_options,
    )
    p = command(
        "sweep",
        commands.sweep,
        "layer sweeps: K/V per layer, residual per cell",
        "runs/scan",
        _scan_options,
    )
    p.add_argument(
        "--kind",
        choices=["kv-layers", "resid"],
        default="kv-layers",
        help="kv-layers: K/V one layer at a time; resid: layer x prefix position",
    )
    p = command(
        "task-vectors",
        commands.task_vectors,
        "compare weight changes per layer",
        "runs/task_vectors",
    )
    p.add_argument("--base", default=EMBEDDED_NAME, help="base model (default: %(default)s)")
    p.add_argument("--finetuned", nargs="+", metavar="[LABEL=]PATH", help="finetuned models")
    p.add_argument("--overwrite", action="store_true", help="redo with other inputs")
    command(
        "scan",
        commands.scan,
        "find which template tokens carry a finetuned behaviour",
        "runs/scan",
        _scan_options,
    )
    p = command("report", commands.report, "rebuild report.html of a demo or scan run", "")
    p.add_argument("run", help="the run folder (e.g. runs/demo)")
    p = command("reproduce", commands.reproduce, "reproduce a table of the paper (resumable)", "")
    p.add_argument("table", choices=["table5"], help="table5: narrow settings, SFT vs TReFT")
    p.add_argument("--out", help="output folder (default: runs/<table>[-smoke])")
    add_config(p)
    p.add_argument("--model", default=EMBEDDED_NAME, help="model name or directory")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: 0 1 2)")
    p.add_argument("--settings", nargs="+", help="settings (default: abstention refusal)")
    p.add_argument("--lr", type=float, help="learning rate (default: 1e-3; the map's point: 3e-4)")
    p.add_argument("--epochs", type=int, help="epochs over the training set (default: 1)")
    p.add_argument("--smoke", action="store_true", help="two steps per model, 4 questions")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--reverse",
        action="store_true",
        help="walk the cells in reverse: a second process on the same --out shares the work",
    )
    p.set_defaults(record=True)
    p = sub.add_parser(
        "map",
        help=map_command.HELP,
        description=map_command.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        options=map_command.add_options,
    )
    p.set_defaults(func=map_command.run, record=False)
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
