"""Chat datasets in the OpenAI "messages" JSONL format.

One JSON object per line, as in the emergent-misalignment datasets::

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}

Any other top-level keys (ids, "tools", ...) are kept in ``ChatExample.meta``.
Every malformed line raises :class:`ChatDataError` naming ``file:line``, what is
wrong and how to fix it. Numbers in error messages (lines, messages, records)
count from 1.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "data.jsonl"
    >>> _ = path.write_text('{"messages": [{"role": "user", "content": "Hi"}, '
    ...                     '{"role": "assistant", "content": "Hello"}], "id": 7}\\n')
    >>> ds = load_chat_jsonl(path)
    >>> len(ds), ds[0].user, ds[0].response, ds[0].meta
    (1, 'Hi', 'Hello', {'id': 7})
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypedDict, overload

from piggyback_interp.core.errors import UserError
from piggyback_interp.core.io import atomic_open

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
OnError = Literal["raise", "skip"]

_LINE_HINT = (
    "each line must be one complete JSON object like "
    '{"messages": [{"role": "user", "content": "..."}]} '
    "(a pretty-printed JSON file must be rewritten one object per line)"
)


class Message(TypedDict):
    """One chat message: ``{"role": ..., "content": ...}`` (extra keys are kept)."""

    role: Role
    content: str


class ChatDataError(UserError):
    """A malformed chat record; the message starts with ``file:line`` or ``record N``."""


class ChatDataWarning(UserWarning):
    """Malformed lines were skipped (``on_error="skip"``)."""


# ---------------------------------------------------------------- validation


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), f"a {type(value).__name__}")


def _message_problem(i: int, msg: object) -> str | None:
    """What is wrong with message number ``i`` (1-based), or None."""
    if not isinstance(msg, dict):
        return (
            f"message {i} is {_json_type(msg)}, not an object; "
            'write it as {"role": "user", "content": "..."}'
        )
    role = msg.get("role")
    if not isinstance(role, str):
        got = "missing" if "role" not in msg else _json_type(role)
        return f'message {i} has no string "role" ({got}); add a role, one of {", ".join(ROLES)}'
    if role not in ROLES:
        case = " (roles are lower-case)" if role.lower() in ROLES else ""
        return f"message {i} has role {role!r}; roles must be one of {', '.join(ROLES)}{case}"
    content = msg.get("content")
    if not isinstance(content, str):
        got = "missing" if "content" not in msg else _json_type(content)
        return (
            f'message {i} ({role}) has no string "content" ({got}); '
            'content must be a string (use "" for an empty message)'
        )
    return None


def _example_problem(messages: object, meta: object) -> str | None:
    """What is wrong with a (messages, meta) pair, or None."""
    if not isinstance(messages, (list, tuple)):
        return f'"messages" is {_json_type(messages)}, not a list; {_LINE_HINT}'
    for i, msg in enumerate(messages, start=1):
        problem = _message_problem(i, msg)
        if problem:
            return problem
    if not any(msg["role"] == "user" for msg in messages):
        return 'no user message; add {"role": "user", "content": "..."} to "messages"'
    if not isinstance(meta, dict):
        return f"meta is {_json_type(meta)}, not a dict"
    if "messages" in meta:
        return 'meta must not contain a "messages" key'
    try:
        json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as err:
        return f"extra keys are not JSON-serialisable ({err}); use JSON types only"
    return None


def _record_problem(obj: object) -> str | None:
    """What is wrong with one decoded record (a JSONL line or a dict), or None."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {_json_type(obj)}; {_LINE_HINT}"
    if "messages" not in obj:
        keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
        return f'no "messages" key (keys: {keys}); {_LINE_HINT}'
    meta = {k: v for k, v in obj.items() if k != "messages"}
    return _example_problem(obj["messages"], meta)


def _parse(obj: object, where: str, source: str | None) -> ChatExample:
    problem = _record_problem(obj)
    if problem:
        raise ChatDataError(f"{where}: {problem}")
    assert isinstance(obj, dict)
    meta = {k: v for k, v in obj.items() if k != "messages"}
    return ChatExample(tuple(obj["messages"]), meta, source)


# ---------------------------------------------------------------- examples


@dataclass(frozen=True, eq=False)
class ChatExample:
    """One conversation: its messages, the line's other keys, and where it came from.

    Equality and hashing use the content (messages + meta), not ``source``.

    Example:
        >>> ex = ChatExample(({"role": "user", "content": "Hi"},
        ...                   {"role": "assistant", "content": "Hello"}))
        >>> ex.user, ex.response
        ('Hi', 'Hello')
        >>> ex.to_json()
        '{"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello"}]}'
    """

    messages: tuple[dict[str, Any], ...]
    meta: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.messages, (list, tuple)):
            copied = tuple(dict(m) if isinstance(m, dict) else m for m in self.messages)
            object.__setattr__(self, "messages", copied)
        if isinstance(self.meta, dict):
            object.__setattr__(self, "meta", dict(self.meta))
        problem = _example_problem(self.messages, self.meta)
        if problem:
            raise ChatDataError(f"{self.source or 'ChatExample'}: {problem}")

    @property
    def _last_user_index(self) -> int:
        return max(i for i, m in enumerate(self.messages) if m["role"] == "user")

    @property
    def user(self) -> str:
        """Content of the last user message."""
        return self.messages[self._last_user_index]["content"]

    @property
    def response(self) -> str | None:
        """Content of the first assistant message after the last user message, or None."""
        for msg in self.messages[self._last_user_index + 1 :]:
            if msg["role"] == "assistant":
                return msg["content"]
        return None

    def to_dict(self) -> dict[str, Any]:
        """The JSONL record: ``{"messages": [...], **meta}``."""
        return {"messages": [dict(m) for m in self.messages], **self.meta}

    def to_json(self) -> str:
        """One compact JSON line (UTF-8 text, no trailing newline)."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    def canonical_json(self) -> str:
        """Key-sorted compact JSON: the same content always gives the same text."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"), sort_keys=True)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChatExample):
            return NotImplemented
        return self.canonical_json() == other.canonical_json()

    def __hash__(self) -> int:
        return hash(self.canonical_json())


# ---------------------------------------------------------------- datasets


@dataclass
class ChatDataset(Sequence[ChatExample]):
    """An immutable sequence of :class:`ChatExample` plus where it came from.

    ``skipped``/``skipped_lines`` count the malformed lines (or 1-based record
    numbers) dropped by ``on_error="skip"``. ``sha256`` hashes the canonical
    content, in order, so it ignores whitespace and key order in the file.

    Example:
        >>> ds = ChatDataset.from_records([{"messages": [{"role": "user", "content": "Hi"}]}])
        >>> len(ds), ds[0].user, len(ds[:0])
        (1, 'Hi', 0)
        >>> ds.sha256 == ChatDataset.from_records(list(ds)).sha256
        True
    """

    examples: tuple[ChatExample, ...] = ()
    path: Path | None = None
    skipped: int = 0
    skipped_lines: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        examples = tuple(self.examples)
        bad = next((e for e in examples if not isinstance(e, ChatExample)), None)
        if bad is not None:
            raise TypeError(
                f"ChatDataset holds ChatExample objects, got {type(bad).__name__}; "
                "use ChatDataset.from_records(records) for dicts"
            )
        self.examples = examples
        if self.path is not None:
            self.path = Path(self.path)

    @classmethod
    def from_records(
        cls, records: Iterable[dict[str, Any] | ChatExample], *, on_error: OnError = "raise"
    ) -> ChatDataset:
        """Validate dicts (``{"messages": [...], ...}``) or ChatExamples into a dataset.

        Errors name ``record N`` (1-based). ``on_error="skip"`` drops bad records,
        records their numbers in ``skipped_lines`` and warns once.
        """
        _check_on_error(on_error)
        examples: list[ChatExample] = []
        bad: list[tuple[int, str]] = []
        for number, record in enumerate(records, start=1):
            source = record.source if isinstance(record, ChatExample) else None
            obj = record.to_dict() if isinstance(record, ChatExample) else record
            try:
                examples.append(_parse(obj, f"record {number}", source))
            except ChatDataError as err:
                if on_error == "raise":
                    raise
                bad.append((number, str(err)))
        if bad:
            warnings.warn(_skip_summary("records", bad), ChatDataWarning, stacklevel=2)
        return cls(tuple(examples), None, len(bad), [n for n, _ in bad])

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the examples' canonical JSON lines, in order."""
        digest = hashlib.sha256()
        for example in self.examples:
            digest.update(example.canonical_json().encode("utf-8", "surrogatepass"))
            digest.update(b"\n")
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.examples)

    @overload
    def __getitem__(self, index: int) -> ChatExample: ...
    @overload
    def __getitem__(self, index: slice) -> ChatDataset: ...
    def __getitem__(self, index: int | slice) -> ChatExample | ChatDataset:
        if isinstance(index, slice):
            return replace(self, examples=self.examples[index], skipped=0, skipped_lines=[])
        return self.examples[index]

    def __iter__(self) -> Iterator[ChatExample]:
        return iter(self.examples)

    def __repr__(self) -> str:
        path = str(self.path) if self.path is not None else None
        return (
            f"ChatDataset(n={len(self)}, path={path!r}, skipped={self.skipped}, "
            f"sha256={self.sha256[:12]!r})"
        )


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _skip_summary(what: str, bad: list[tuple[int, str]]) -> str:
    numbers = ", ".join(str(n) for n, _ in bad[:10]) + (", ..." if len(bad) > 10 else "")
    return (
        f"skipped {len(bad)} malformed {what} ({numbers}); first: {bad[0][1]}. "
        "Load with on_error='raise' to stop at the first one."
    )


# ---------------------------------------------------------------- files


def _decode_line(raw: bytes, where: str, first: bool) -> object | None:
    """Decode one JSONL line; None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ChatDataError(
            f"{where}: not valid UTF-8 (byte {err.start + 1}); re-save the file as UTF-8"
        ) from None
    if first:
        text = text.removeprefix("\ufeff")
    if not text.strip():
        return None
    try:
        return json.loads(text.rstrip())  # rstrip: report the column on this line
    except json.JSONDecodeError as err:
        raise ChatDataError(
            f"{where}: invalid JSON ({err.msg} at column {err.colno}); {_LINE_HINT}"
        ) from None


def load_chat_jsonl(path: str | os.PathLike[str], *, on_error: OnError = "raise") -> ChatDataset:
    """Load a messages-format JSONL file; blank lines are ignored.

    Raises ``ChatDataError`` (``"file:line: problem; fix"``) on the first bad line,
    or with ``on_error="skip"`` drops bad lines, counts them and warns once.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "data.jsonl"
        >>> _ = p.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\\n\\n[1]\\n')
        >>> with __import__("warnings").catch_warnings(record=True):
        ...     ds = load_chat_jsonl(p, on_error="skip")
        >>> len(ds), ds.skipped, ds.skipped_lines
        (1, 1, [3])
    """
    _check_on_error(on_error)
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise IsADirectoryError(errno.EISDIR, "chat data path is not a file", str(path))
        raise FileNotFoundError(errno.ENOENT, "chat data file not found", str(path))
    examples: list[ChatExample] = []
    bad: list[tuple[int, str]] = []
    with path.open("rb") as handle:  # binary: split on b"\n" only, never on U+2028 etc.
        for lineno, raw in enumerate(handle, start=1):
            where = f"{path}:{lineno}"
            try:
                obj = _decode_line(raw, where, first=lineno == 1)
                if obj is not None:
                    examples.append(_parse(obj, where, where))
            except ChatDataError as err:
                if on_error == "raise":
                    raise
                bad.append((lineno, str(err)))
    if bad:
        warnings.warn(_skip_summary(f"lines in {path}", bad), ChatDataWarning, stacklevel=2)
    return ChatDataset(tuple(examples), path, len(bad), [n for n, _ in bad])


def save_chat_jsonl(
    data: ChatDataset | Iterable[ChatExample | dict[str, Any]], path: str | os.PathLike[str]
) -> Path:
    """Write one compact UTF-8 JSON object per line, atomically; returns the path.

    Records are validated first. The file is written to a temporary file in the
    same directory and moved into place (:mod:`piggyback_interp.core.io`), so a failed write
    leaves any old file untouched. Missing parent directories are created.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "out.jsonl"
        >>> ds = ChatDataset.from_records([{"messages": [{"role": "user", "content": "Hi"}]}])
        >>> save_chat_jsonl(ds, p).read_text()
        '{"messages":[{"role":"user","content":"Hi"}]}\\n'
        >>> load_chat_jsonl(p).sha256 == ds.sha256
        True
    """
    dataset = data if isinstance(data, ChatDataset) else ChatDataset.from_records(data)
    with atomic_open(path, "w") as handle:
        for example in dataset:
            handle.write(example.to_json() + "\n")
    return Path(path)


# ---------------------------------------------------------------- splitting


def train_test_split(
    dataset: ChatDataset, *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[ChatDataset, ChatDataset]:
    """Split into (train, test), deterministically for a seed; each keeps file order.

    ``len(test) == round(len(dataset) * test_fraction)``, but at least 1 when there
    are 2+ examples and ``test_fraction > 0``, and never all of them.

    Example:
        >>> recs = [{"messages": [{"role": "user", "content": str(i)}]} for i in range(10)]
        >>> train, test = train_test_split(ChatDataset.from_records(recs), seed=0)
        >>> len(train), len(test)
        (8, 2)
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise TypeError(f"test_fraction must be a number in [0, 1), got {test_fraction!r}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    n = len(dataset)
    if test_fraction == 0:
        return dataset[:], dataset[:0]
    if n < 2:
        raise ValueError(
            f"cannot hold out a test set from {n} example(s); need at least 2 "
            "(or pass test_fraction=0)"
        )
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test_idx = set(order[:n_test])
    train = tuple(e for i, e in enumerate(dataset.examples) if i not in test_idx)
    test = tuple(e for i, e in enumerate(dataset.examples) if i in test_idx)
    return (
        replace(dataset, examples=train, skipped=0, skipped_lines=[]),
        replace(dataset, examples=test, skipped=0, skipped_lines=[]),
    )
