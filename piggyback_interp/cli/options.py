"""Options every command shares, dataclass fields as options, and the ``--config`` file."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import functools
import inspect
import itertools
import json
import os
import textwrap
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from piggyback_interp.core.embedded import EMBEDDED_NAME
from piggyback_interp.core.errors import UserError
from piggyback_interp.core.runs import ConfigFileError, load_config, write_json

# parser bookkeeping, not options
NOT_OPTIONS = {"func", "command", "help", "version", "record", "config"}
# how to run, not what is computed: never recorded in config.json, so that reusing it as
# --config never deletes or moves results
RUN_CONTROL = {"out", "quiet", "overwrite", "threads", "reverse"}
# an option that deletes results is taken from the command line only, never a file
COMMAND_LINE_ONLY = {"overwrite"}


class UsageError(UserError):
    """A command line that is missing or contradicts something (exit code 2)."""


def add_config(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``: its values become the command's defaults (:func:`apply_config_file`)."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML/YAML/JSON file of option = value (flags given here override it); "
        "every run writes its resolved options to <out>/config.json, itself a --config file",
    )


def add_common(parser: argparse.ArgumentParser, *, out: str) -> None:
    """``--config``, ``--out``, ``--quiet``."""
    add_config(parser)
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


def check_device(device: str | None) -> None:
    """Raise :class:`UsageError` (with the fix) for a ``--device`` this machine lacks."""
    if not device or device == "cpu":
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(
            f"--device {device} is not a torch device; use cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {device}: CUDA is not available on this machine (this torch "
                f"{torch.__version__} sees no NVIDIA GPU); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of those"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(
            f"--device {device}: MPS is not available on this machine; use --device cpu"
        )


def placement(args: argparse.Namespace) -> Any:
    """The :class:`~piggyback_interp.core.placement.Placement` of ``--device-map`` (``None`` without)."""
    device_map = getattr(args, "device_map", None)
    if not device_map:
        if getattr(args, "max_memory", None) or getattr(args, "offload_folder", None):
            raise UsageError("--max-memory and --offload-folder need --device-map (e.g. auto)")
        return None
    from piggyback_interp.core.placement import Placement

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


def _is_choice(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, enum.Enum)


def _option_hint(annotation: Any) -> Any:
    """A field's annotation as its option takes it: an enum field (``Method | str``: the
    dataclass takes the string too) takes only the enum's values."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return annotation
    if not any(_is_choice(a) for a in args):
        return annotation
    rest = tuple(a for a in args if a is not str)
    return typing.Union[rest] if len(rest) > 1 else rest[0]  # noqa: UP007


def _unwrap(annotation: Any) -> tuple[Any, bool, bool]:
    """(element type, is a tuple, may be None) of a dataclass field's annotation: its flag."""
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


# --- typed values: one pydantic validator per option, for flags and config files --------------


def _none_text(value: Any) -> Any:
    """``"none"`` unsets an optional option (TOML has no null)."""
    return None if isinstance(value, str) and value.strip().lower() == "none" else value


def _one_or_many(value: Any) -> Any:
    """One value for a many-valued option is a list of one."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


def _strict(hint: Any) -> Any:
    """``hint`` as pydantic validates an option's value: booleans only as true/false (never the
    strings "no" or "false"), numbers from numbers or their text ("1e-2", as YAML 1.1 reads it)
    but never from booleans, finite floats, ``"none"`` for ``None``, lists for tuples."""
    from pydantic import AllowInfNan, BeforeValidator, StrictBool, StrictStr

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner: Any = typing.Union[tuple(_strict(a) for a in args)]  # noqa: UP007
        return Annotated[inner, BeforeValidator(_none_text)] if type(None) in args else inner
    if origin in (tuple, list):
        return Annotated[list[_strict(args[0])], BeforeValidator(_one_or_many)]  # type: ignore[misc]
    scalars: dict[Any, Any] = {
        bool: StrictBool,
        int: Annotated[int, BeforeValidator(_not_bool)],
        float: Annotated[float, BeforeValidator(_not_bool), AllowInfNan(False)],
        str: StrictStr,
    }
    return scalars.get(hint, hint)


@functools.cache
def _adapter(hint: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(_strict(hint))


def describe(hint: Any) -> str:
    """What an option takes, in words: ``int | None`` -> ``an integer or "none"``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if _is_choice(hint):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    words = {
        bool: "true or false (unquoted)",
        int: "an integer",
        float: "a finite number",
        str: "a string",
        type(None): '"none"',
    }
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def parse_value(hint: Any, value: Any) -> Any:
    """``value`` validated as ``hint`` (see :func:`_strict`); ``ValueError`` if it is not one."""
    from pydantic import ValidationError

    try:
        return _adapter(hint).validate_python(value)
    except ValidationError as err:
        raise ValueError(f"expected {describe(hint)}") from err


def _flag_type(hint: Any) -> Any:
    """An argparse ``type=`` that reads a flag's text as ``hint``."""

    def convert(text: str) -> Any:
        return parse_value(hint, text)

    base = (
        typing.get_args(hint)[0]
        if typing.get_origin(hint) in (typing.Union, types.UnionType)
        else hint
    )
    convert.__name__ = getattr(base, "__name__", "value")  # argparse names it in its errors
    return convert


def option_type(action: argparse.Action) -> Any:
    """The type of an option's value: the dataclass field's annotation, or what the flag takes."""
    hint = getattr(action, "hint", None)
    if hint is not None:
        return hint
    flags = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)
    if isinstance(action, flags):
        return bool
    item: Any = action.type if action.type in (int, float) else str
    if action.choices is not None:
        item = Literal[tuple(action.choices)]
    if action.nargs in ("+", "*"):
        item = list[item]
    return item | None if action.default is None else item


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field of dataclass ``cls`` -> its attribute docstring (the string literal on the
    lines under it, as Sphinx and mkdocstrings read it), on one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (defined in a REPL): no help text
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _choices(kind: Any) -> tuple[Any, ...] | None:
    """The values a ``Literal[...]`` or an ``Enum`` allows (``None`` for other types)."""
    if typing.get_origin(kind) is Literal:
        return typing.get_args(kind)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return tuple(m.value for m in kind)
    return None


def _text(value: Any) -> str:
    return str(value.value if isinstance(value, enum.Enum) else value)


def add_dataclass(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
    choices: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """One ``--field-name`` option per field of ``cls`` (tuples take several values), its help
    the field's docstring (:func:`field_docs`), its choices those of a ``Literal`` or ``Enum``
    annotation (or ``choices[name]``); a config file's value for it is validated against the
    field's annotation (or its ``choices``)."""
    hints = {name: _option_hint(hint) for name, hint in typing.get_type_hints(cls).items()}
    docs = field_docs(cls)
    choices = choices or {}
    defaults = defaults or {}
    group = parser.add_argument_group(f"{cls.__name__} options")
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        kind, many, optional = _unwrap(hints[field.name])
        default = defaults.get(field.name, field.default)
        flag = "--" + field.name.replace("_", "-")
        shown = (
            "none"
            if default is None
            else (" ".join(map(_text, default)) if many else _text(default))
        )
        doc = docs.get(field.name, "").replace("%", "%%")
        allowed = choices.get(field.name) or _choices(kind)
        if kind is bool:
            action = group.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{doc} (default: {shown})",
            )
        else:
            metavar = field.name.upper()
            if allowed:  # argparse writes {a,b}, but an Enum's members by their repr
                metavar = "{" + ",".join(map(_text, allowed)) + "}"
            action = group.add_argument(
                flag,
                # an enum's flag is checked against its choices (the dataclass takes the text)
                type=None if _is_choice(kind) else _flag_type(kind | None if optional else kind),
                nargs="+" if many else None,
                choices=allowed,
                default=default,
                metavar=metavar,
                help=f"{doc} (default: {shown}{'; none: unset' if optional else ''})",
            )
        hint = hints[field.name]
        if field.name in choices:  # the field is a str: validate a config file's value as these
            hint = Literal[tuple(choices[field.name])]
            hint = tuple[hint, ...] if many else hint  # type: ignore[valid-type]
            hint = hint | None if optional else hint
        action.hint = hint  # type: ignore[attr-defined]


def dataclass_from(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """Build ``cls`` from the parsed options named after its fields (an enum field's text
    becomes its member)."""
    hints = {name: _option_hint(hint) for name, hint in typing.get_type_hints(cls).items()}
    values = {}
    for field in dataclasses.fields(cls):
        if hasattr(args, field.name):
            value = getattr(args, field.name)
            kind, _, _ = _unwrap(hints[field.name])
            if _is_choice(kind):
                value = (
                    [kind(v) for v in value]
                    if isinstance(value, list)
                    else (None if value is None else kind(value))
                )
            values[field.name] = tuple(value) if isinstance(value, list) else value
    values.update(extra)
    return cls(**values)


def apply_config_file(
    parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, path: str
) -> None:
    """Make the file's values the defaults of ``sub`` (flags on the command line still win).

    Each value is validated against its option's type (:func:`parse_value`); one that does
    not parse, an unknown key, or a command-line-only option (``overwrite``) raises
    :class:`ConfigFileError` naming the key.
    """
    values = load_config(path)
    actions = {a.dest: a for a in sub._actions if a.dest not in NOT_OPTIONS}
    refused = sorted(set(values) & COMMAND_LINE_ONLY)
    if refused:
        raise ConfigFileError(
            f"config file {path}: {', '.join(refused)} deletes results, so it is taken from the "
            f"command line only: remove it from the file and pass --{refused[0]} if you mean it"
        )
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ConfigFileError(
            f"config file {path}: unknown option(s) {unknown} for this command; "
            f"valid: {sorted(actions)}"
        )
    parsed = {}
    for key, value in values.items():
        try:
            parsed[key] = parse_value(option_type(actions[key]), value)
        except ValueError as err:
            raise ConfigFileError(f"config file {path}: {key} = {value!r}: {err}") from None
    sub.set_defaults(**parsed)


def require(args: argparse.Namespace, *names: str) -> None:
    missing = [n for n in names if getattr(args, n, None) in (None, "", [])]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise UsageError(f"missing {flags} (give it on the command line or in --config FILE)")


def record_config(args: argparse.Namespace) -> Path:
    """Write the resolved options to ``<out>/config.json`` (a valid ``--config`` file).

    Only what defines the results: run control (``--out``, ``--overwrite``, ``--quiet``, ...)
    is left out, so reusing the file as ``--config`` never deletes or moves anything. The CLI
    writes it when a command finished, so it describes the results in the folder.
    """
    from piggyback_interp.core import distributed

    out = Path(args.out)
    values = {k: v for k, v in vars(args).items() if k not in NOT_OPTIONS | RUN_CONTROL}
    if not distributed.is_main():  # under a launcher, rank 0 writes
        return out / "config.json"
    return write_json(out / "config.json", values)


def progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


def is_path(name: str) -> bool:
    return os.path.exists(name)
