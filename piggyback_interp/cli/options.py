"""Options every command shares, dataclass fields as options, and the ``--config`` file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

from piggyback_interp.embedded import EMBEDDED_NAME
from piggyback_interp.runs import ConfigFileError, load_config, write_json

# options that are not part of a run's recorded config
NOT_CONFIG = {"func", "config", "command", "quiet", "help"}


class UsageError(ValueError):
    """A command line that is missing or contradicts something (exit code 2)."""


def add_common(parser: argparse.ArgumentParser, *, out: str) -> None:
    """``--config``, ``--out``, ``--quiet``."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML/YAML/JSON file of option = value (flags given here override it); "
        "every run writes its resolved options to <out>/config.json, itself a --config file",
    )
    parser.add_argument("--out", default=out, help="run folder (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_device(parser: argparse.ArgumentParser, *, placement: bool = True) -> None:
    """``--device``, ``--dtype`` and (for inference) ``--device-map`` and its options."""
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default: float32; bfloat16 on a GPU for 7-8B models)",
    )
    if not placement:
        return
    parser.add_argument(
        "--device-map",
        metavar="MAP",
        help="spread a big model over GPUs or CPU and disk (HF device_map): auto, balanced, "
        "sequential, or a JSON object of module -> device; overrides --device",
    )
    parser.add_argument(
        "--max-memory",
        metavar="DEV=SIZE,...",
        help="per-device cap for --device-map, e.g. 0=70GiB,1=70GiB,cpu=100GiB",
    )
    parser.add_argument(
        "--offload-folder", metavar="DIR", help="where --device-map puts weights mapped to disk"
    )


def placement(args: argparse.Namespace) -> Any:
    """The :class:`~piggyback_interp.models.Placement` of ``--device-map`` (``None`` without)."""
    device_map = getattr(args, "device_map", None)
    if not device_map:
        if getattr(args, "max_memory", None) or getattr(args, "offload_folder", None):
            raise UsageError("--max-memory and --offload-folder need --device-map (e.g. auto)")
        return None
    from piggyback_interp.models import Placement

    if device_map.lstrip().startswith("{"):
        try:
            device_map = json.loads(device_map)
        except json.JSONDecodeError as err:
            raise UsageError(f"--device-map is not valid JSON: {err}") from err
    memory: dict[int | str, str] | None = None
    if args.max_memory:
        memory = {}
        for item in args.max_memory.split(","):
            dev, sep, size = item.partition("=")
            if not sep or not dev.strip() or not size.strip():
                raise UsageError(f"--max-memory wants DEV=SIZE,... (e.g. 0=70GiB), got {item!r}")
            dev = dev.strip()
            memory[int(dev) if dev.isdigit() else dev] = size.strip()
    return Placement(device_map, max_memory=memory, offload_folder=args.offload_folder)


def add_pair(parser: argparse.ArgumentParser) -> None:
    """``--base`` and ``--finetuned``: hub ids, local directories or LoRA adapter folders."""
    parser.add_argument(
        "--base", default=EMBEDDED_NAME, help="base model: hub id, directory (default: %(default)s)"
    )
    parser.add_argument(
        "--finetuned",
        help="finetuned model: hub id, directory, or a LoRA adapter folder (required)",
    )


def add_prompts(parser: argparse.ArgumentParser, *, n: int) -> None:
    parser.add_argument(
        "--prompts",
        metavar="FILE",
        help="general prompts, one per line (.txt) or a chat JSONL's user turns "
        "(default: the shipped general questions)",
    )
    parser.add_argument(
        "--n-prompts", type=int, default=n, help="how many prompts (default: %(default)s)"
    )
    parser.add_argument(
        "--skip-long",
        action="store_true",
        help="skip prompts longer than the model's context (listed in "
        "<out>/skipped_prompts.json) instead of stopping with an error",
    )


def _unwrap(annotation: Any) -> tuple[type, bool, bool]:
    """(element type, is a tuple, may be None) of a dataclass field's annotation."""
    hint, optional = annotation, False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        optional = type(None) in args
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is tuple:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


def _converter(kind: type, optional: bool) -> Any:
    base = kind if kind in (int, float) else str

    def convert(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        return base(text)

    convert.__name__ = base.__name__  # argparse names the type in its error messages
    return convert


def add_dataclass(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """One ``--field-name`` option per field of ``cls`` (tuples take several values)."""
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    group = parser.add_argument_group(f"{cls.__name__} options")
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        kind, many, optional = _unwrap(hints[field.name])
        default = defaults.get(field.name, field.default)
        flag = "--" + field.name.replace("_", "-")
        shown = "none" if default is None else (" ".join(map(str, default)) if many else default)
        if kind is bool:
            group.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"(default: {shown})",
            )
            continue
        group.add_argument(
            flag,
            type=_converter(kind, optional),
            nargs="+" if many else None,
            default=default,
            metavar=field.name.upper(),
            help=f"(default: {shown}{'; none: unset' if optional else ''})",
        )


def dataclass_from(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """Build ``cls`` from the parsed options named after its fields."""
    values = {}
    for field in dataclasses.fields(cls):
        if hasattr(args, field.name):
            value = getattr(args, field.name)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    values.update(extra)
    return cls(**values)


def apply_config_file(
    parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, path: str
) -> None:
    """Make the file's values the defaults of ``sub`` (flags on the command line still win)."""
    values = load_config(path)
    valid = {a.dest for a in sub._actions} - NOT_CONFIG
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigFileError(
            f"config file {path}: unknown option(s) {unknown} for this command; "
            f"valid: {sorted(valid)}"
        )
    actions = {a.dest: a for a in sub._actions}
    sub.set_defaults(**{k: _coerce(actions[k], v, path) for k, v in values.items()})


def _coerce(action: argparse.Action, value: Any, path: str) -> Any:
    """A file's value as its flag would give it (``5`` -> ``5.0`` for a float option), so
    config.json and the step keys do not depend on how a number was written."""
    convert = action.type
    if action.choices is not None and value not in action.choices:
        raise ConfigFileError(
            f"config file {path}: {action.dest} = {value!r}; choose one of {list(action.choices)}"
        )
    if value is None or not callable(convert):
        return value
    try:
        if action.nargs in ("+", "*"):
            return [convert(str(v)) for v in (value if isinstance(value, list) else [value])]
        if isinstance(value, (list, dict)):
            raise ValueError("expected a single value")
        return convert(str(value))
    except (TypeError, ValueError) as err:
        raise ConfigFileError(
            f"config file {path}: {action.dest} = {value!r} is not a valid value ({err})"
        ) from err


def require(args: argparse.Namespace, *names: str) -> None:
    missing = [n for n in names if getattr(args, n, None) in (None, "", [])]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise UsageError(f"missing {flags} (give it on the command line or in --config FILE)")


def record_config(args: argparse.Namespace) -> Path:
    """Write the resolved options to ``<out>/config.json`` (a valid ``--config`` file)."""
    from piggyback_interp import distributed

    out = Path(args.out)
    values = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG and k != "out"}
    if not distributed.is_main():  # under a launcher, rank 0 writes
        return out / "config.json"
    return write_json(out / "config.json", values)


def progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


def is_path(name: str) -> bool:
    return os.path.exists(name)
