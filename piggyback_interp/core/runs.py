"""Run directories: every step's outputs, what produced them, and resumption.

A :class:`RunDir` is a folder with one sub-folder per step. :meth:`RunDir.step` runs
a step only if it has not finished before with the same ``key`` (its inputs: config,
model hashes, upstream results); a finished step has ``step.json`` (key, seconds,
versions), written last and atomically, so an interrupted step is redone on the
next run and a finished one is never recomputed. Steps that checkpoint themselves
(finetuning, sweeps) resume from their own checkpoints inside the step folder.

Config files (:func:`load_config`) are TOML, YAML or JSON mappings whose keys are
the command's option names (the CLI checks each value against its option's type); the
resolved options of every command, without run control such as ``--out``, are written to
``<run>/config.json``, itself a valid ``--config`` file.

Example:
    >>> import tempfile
    >>> run = RunDir(tempfile.mkdtemp())
    >>> calls = []
    >>> def compute(folder):
    ...     calls.append(1)
    ...     (folder / "answer.txt").write_text("42")
    >>> folder = run.step("answer", {"question": "life"}, compute)
    >>> folder = run.step("answer", {"question": "life"}, compute)   # cached
    >>> len(calls), (folder / "answer.txt").read_text(), run.timings["answer"]["cached"]
    (1, '42', True)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from piggyback_interp.core.errors import DiskError, StaleRunError, UserError, disk_error
from piggyback_interp.core.io import write_json  # importable from here as before
from piggyback_interp.core.provenance import machine, versions

STEP_FILE = "step.json"
STARTED_FILE = "step.started.json"


class StaleStepError(StaleRunError, RuntimeError):
    """A step folder holds results of other inputs; says which inputs differ and what to do."""

    def __init__(self, name: str, folder: Path, old: Mapping[str, Any], new: Mapping[str, Any]):
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        super().__init__(
            f"{folder} holds step {name!r} run with other inputs (changed: {', '.join(changed)}); "
            "use another --out folder, or pass --overwrite to redo it (its results are deleted)"
        )
        self.changed = changed


class ConfigFileError(UserError):
    """A config file that cannot be read, names options the command lacks, or holds a value
    that is not of its option's type (exit code 2)."""


def fingerprint(key: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able mapping (sorted keys; non-JSON values by ``str``)."""
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_json(path: str | os.PathLike[str], default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text("utf-8")) if path.is_file() else default


class RunDir:
    """A folder of cached steps. ``timings`` records each step's seconds and whether it was cached."""

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as err:
            raise UserError(
                f"cannot create the run folder {self.path}: {err.strerror} (a file is in the "
                "way); use another folder"
            ) from err
        except OSError as err:
            disk = disk_error(err)  # full disk, read-only parent: exit code 4 in the CLI
            if disk is None:
                raise
            raise disk from err
        if not os.access(self.path, os.W_OK):  # a read-only folder: say so before any work
            raise DiskError(
                f"the run folder {self.path} is not writable; make it writable or use another "
                "--out, then run the same command again"
            )
        self.timings: dict[str, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def write_record(self, command: str, start: float, started: str, **fields: Any) -> Path:
        """Write the run's record, ``run.json``: the command, ``fields``, every step's
        timing, the wall seconds since ``start`` (``time.perf_counter()``) and the steps'
        compute seconds, when it started and finished, versions and machine."""
        seconds = sum(t["seconds"] or 0 for t in self.timings.values())
        return write_json(
            self.path / "run.json",
            {
                "command": command,
                **fields,
                "steps": self.timings,
                "wall_seconds": round(time.perf_counter() - start, 1),
                "compute_seconds": round(seconds, 1),
                "started": started,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "versions": versions(),
                "machine": machine(),
            },
        )

    def folder(self, name: str) -> Path:
        """The folder of step ``name`` (``/`` in a name makes sub-folders)."""
        return self.path / name

    def finished(self, name: str, key: Mapping[str, Any]) -> bool:
        """Whether step ``name`` finished with this ``key``."""
        record = read_json(self.folder(name) / STEP_FILE)
        return bool(record) and record.get("fingerprint") == fingerprint(key)

    def step(
        self,
        name: str,
        key: Mapping[str, Any],
        compute: Callable[[Path], Any],
        *,
        fresh: bool = False,
    ) -> Path:
        """Run ``compute(folder)`` unless step ``name`` already finished with ``key``; return the folder.

        ``compute`` writes its outputs into the folder (read them back from there:
        cached or not, the caller loads the same files). With the same key, an interrupted
        step finds its own partial outputs (checkpoints) in place to resume from. A folder
        holding the step run with a different key raises :class:`StaleStepError` (nothing
        finished is deleted) unless the run was opened with ``overwrite=True``, which
        redoes it in an emptied folder. ``fresh=True`` always starts from an empty folder.
        """
        folder = self.folder(name)
        if self.finished(name, key):
            record = read_json(folder / STEP_FILE)
            self.timings[name] = {"seconds": record.get("seconds"), "cached": True}
            return folder
        started = read_json(folder / STARTED_FILE)
        if started and started.get("fingerprint") != fingerprint(key):
            if not self.overwrite:
                raise StaleStepError(name, folder, started.get("key", {}), key)
            fresh = True  # outputs of other inputs: never resume from them
        from piggyback_interp.core import distributed  # imports torch: only when a step runs

        main = distributed.is_main()  # under a launcher, rank 0 keeps the books
        if main:
            if fresh and folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / STEP_FILE).unlink(missing_ok=True)
            write_json(
                folder / STARTED_FILE,
                {"step": name, "fingerprint": fingerprint(key), "key": dict(key)},
            )
        distributed.barrier()
        start = time.perf_counter()
        compute(folder)
        seconds = round(time.perf_counter() - start, 2)
        if main:
            write_json(
                folder / STEP_FILE,
                {
                    "step": name,
                    "fingerprint": fingerprint(key),
                    "key": dict(key),
                    "seconds": seconds,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "versions": versions(),
                },
            )
        distributed.barrier()
        self.timings[name] = {"seconds": seconds, "cached": False}
        return folder


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON (``.json``) mapping.

    Keys may use ``-`` or ``_`` (``lora-rank`` = ``lora_rank``); they are returned with
    ``_``. Raises :class:`ConfigFileError` with the file name and the parser's message.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigFileError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    text = path.read_text("utf-8")
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
            data = {} if data is None else data  # an empty file; [] or 0 is no mapping
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigFileError(
                f"config file {path}: unknown format {suffix!r}; use .toml, .yaml, .yml or .json"
            )
    except ConfigFileError:
        raise
    except Exception as err:  # each parser has its own error type
        raise ConfigFileError(
            f"config file {path} is not valid {suffix[1:].upper()}: {err}"
        ) from err
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path} must hold a mapping of option = value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


__all__ = [
    "ConfigFileError",
    "RunDir",
    "StaleStepError",
    "fingerprint",
    "load_config",
    "read_json",
    "write_json",
]
