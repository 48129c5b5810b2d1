"""Atomic, durable writes: every file the toolkit saves goes through here.

A file is written to a temporary file in the same folder, flushed and ``fsync``-ed,
moved onto its name with ``os.replace`` and the folder ``fsync``-ed (where the system
supports it): a reader sees the old file or the whole new one, never a part, and a
power cut after the call returns loses nothing. On ANY failure, ``KeyboardInterrupt``
included, the temporary file is removed and the old file is left as it was.

A write that fails for lack of space (or on a read-only folder or a full quota) raises
:class:`~piggyback_interp.core.errors.DiskError` (an ``OSError`` with the ``errno`` kept and
the file's name); other ``OSError`` s keep their ``errno`` (and so their subclass) and
name the file. Writers that hide the ``errno`` (``torch.save`` reports "unexpected
pos", safetensors "os error 28") get it back.

Checkpoints written here are read back with :func:`load_checkpoint`, which turns a
truncated or foreign file into a :class:`CorruptCheckpointError` naming the file and
the fix.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "answer.json"
    >>> write_json(path, {"answer": 42}).read_text()
    '{\\n  "answer": 42\\n}\\n'
    >>> with atomic_open(path, "w") as handle:
    ...     _ = handle.write("half")
    ...     raise RuntimeError("the writer failed midway")
    Traceback (most recent call last):
    RuntimeError: the writer failed midway
    >>> path.read_text()[:12], sorted(p.name for p in path.parent.iterdir())
    ('{\\n  "answer"', ['answer.json'])
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from piggyback_interp.core.errors import DiskError, UserError

# errnos that mean "the disk will not take it": DiskError (CLI exit code 4)
DISK_ERRNOS = frozenset(
    {errno_codes.ENOSPC, errno_codes.EROFS, getattr(errno_codes, "EDQUOT", errno_codes.ENOSPC)}
)
# what some writers print instead of raising an OSError: Rust's io::Error, torch's C++
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)|\[errno (\d+)\]", re.IGNORECASE)


class CorruptCheckpointError(UserError):
    """A checkpoint that cannot be read back (truncated by a kill or a full disk, or not ours)."""


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened (Windows)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems refuse to fsync a folder: nothing more to do
        if err.errno not in (errno_codes.EINVAL, errno_codes.ENOTSUP, errno_codes.EBADF):
            raise
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _found_errno(err: BaseException, seen: OSError | None) -> int | None:
    """The errno behind ``err``: its own, one a wrapped writer saw, or one in its text."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    if seen is not None and seen.errno is not None:
        return seen.errno
    match = _OS_ERROR_IN_TEXT.search(str(err)) if isinstance(err, Exception) else None
    return int(match.group(1) or match.group(2)) if match else None


def _disk_error(err: BaseException, path: Path, seen: OSError | None = None) -> BaseException:
    """``err`` as the OSError (or DiskError) it stands for, naming ``path``; else ``err``."""
    code = _found_errno(err, seen)
    if code is None or isinstance(err, DiskError):
        return err
    reason = os.strerror(code)
    if code in DISK_ERRNOS:
        return DiskError(code, f"{reason} (writing {path})", str(path))
    return OSError(code, reason, str(path))  # OSError picks the subclass (PermissionError...)


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str], *, seen: list[OSError] | None = None
) -> Iterator[Path]:
    """A temporary path next to ``path`` for a writer that takes a file name; when the
    block ends without an error it is fsync-ed and moved onto ``path``, else removed.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "weights.bin"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_bytes(b"\\x00" * 4)
        >>> target.stat().st_size
        4
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _disk_error(err, path) from err
    tmp = _tmp_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        _remove(tmp)
        mapped = _disk_error(err, path, seen[-1] if seen else None)
        if mapped is err:
            raise
        raise mapped from err
    try:
        _fsync_dir(path.parent)
    except OSError as err:
        raise _disk_error(err, path) from err


class _Recording:
    """A binary file that remembers the OSError of a failed write (torch.save swallows it)."""

    def __init__(self, handle: IO[bytes], seen: list[OSError]) -> None:
        self._handle, self._seen = handle, seen

    def write(self, data: Any) -> int:
        try:
            return self._handle.write(data)
        except OSError as err:
            self._seen.append(err)
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "wb", *, encoding: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file for writing (``"w"`` text, UTF-8 and ``\\n`` line ends;
    ``"wb"`` binary) that replaces ``path`` when the block ends without an error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    seen: list[OSError] = []
    with atomic_path(path, seen=seen) as tmp:
        if mode == "w":
            with open(tmp, "w", encoding=encoding or "utf-8", newline="\n") as handle:
                yield handle
        else:
            with open(tmp, "wb") as raw:
                yield _Recording(raw, seen)  # type: ignore[misc]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON (sorted keys; other values by ``str``), atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_parquet(frame: Any, path: str | os.PathLike[str]) -> Path:
    """Write a pandas DataFrame to ``path`` as parquet, atomically; returns the path."""
    with atomic_open(path, "wb") as handle:
        frame.to_parquet(handle)
    return Path(path)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)``, atomically (a full disk raises DiskError, not "unexpected pos")."""
    import torch

    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)
    return Path(path)


def atomic_save_safetensors(
    tensors: Mapping[str, Any], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file``, atomically (its errors keep their errno)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=metadata)
    return Path(path)


@contextlib.contextmanager
def atomic_files(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder next to ``folder`` for writers that fill a folder
    (``save_pretrained``); when the block ends without an error each file in it is
    fsync-ed and moved into ``folder`` (created if needed; other files there are
    kept), else the temporary folder is removed. Each file is replaced atomically."""
    folder = Path(folder)
    staging = _tmp_name(folder)
    try:
        staging.mkdir(parents=True)
        yield staging
        folder.mkdir(parents=True, exist_ok=True)
        folders = {folder}
        for item in sorted(p for p in staging.rglob("*") if p.is_file()):
            target = folder / item.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            _fsync_file(item)
            os.replace(item, target)
            folders.add(target.parent)
        for sub in folders:
            _fsync_dir(sub)
    except BaseException as err:
        mapped = _disk_error(err, folder)
        if mapped is err:
            raise
        raise mapped from err
    finally:
        _remove(staging)


def load_checkpoint(path: str | os.PathLike[str], *, redo: str) -> Any:
    """``torch.load(path, weights_only=True)``; a truncated or foreign file raises
    :class:`CorruptCheckpointError` naming it and the fix (``redo``: what deleting it redoes)."""
    import pickle

    import torch

    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as err:
        # torch reads a truncated zip as "[Errno 22] Invalid argument"; other OSErrors
        # (a missing or unreadable file) are what they say
        if isinstance(err, OSError) and err.errno != errno_codes.EINVAL:
            raise
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CorruptCheckpointError(
            f"the checkpoint {path} cannot be read ({reason}): it is truncated (a kill or a full "
            f"disk while it was written) or not a checkpoint of this toolkit; delete it and run "
            f"again to redo {redo} from the start"
        ) from err


def _fingerprint(meta: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()


def resume_checkpoint(checkpoint: Any, meta: Mapping[str, Any], values: Any) -> set[int]:
    """The chunks a checkpoint of the same sweep (same ``meta``) has done, its values
    copied into ``values``; empty when ``checkpoint`` is None or not written yet."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return set()
    saved = load_checkpoint(checkpoint, redo="this sweep")
    if saved["fingerprint"] != _fingerprint(meta):
        raise UserError(
            f"the checkpoint {checkpoint} belongs to another sweep (other model, prompts, site, "
            "layers or metric); delete it or pass another checkpoint path"
        )
    values.copy_(saved["values"])
    return set(saved["done"].tolist())


def save_checkpoint(checkpoint: Any, meta: Mapping[str, Any], values: Any, done: set[int]) -> None:
    """Save a sweep's ``values`` so far and its ``done`` chunks, fingerprinted by ``meta``
    (atomic; nothing when ``checkpoint`` is None). :func:`resume_checkpoint` reads it."""
    if checkpoint is None:
        return
    import torch

    atomic_torch_save(
        {"fingerprint": _fingerprint(meta), "values": values, "done": torch.tensor(sorted(done))},
        checkpoint,
    )


__all__ = [
    "DISK_ERRNOS",
    "CorruptCheckpointError",
    "atomic_files",
    "atomic_open",
    "atomic_path",
    "atomic_save_safetensors",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_parquet",
    "atomic_write_text",
    "load_checkpoint",
    "resume_checkpoint",
    "save_checkpoint",
    "write_json",
]
