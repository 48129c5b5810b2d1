"""Atomic writes: whole files or none, fsync before the rename, no temporary files left
behind on ANY failure, a full disk reported as one (errno kept), truncated checkpoints
named with the fix."""

from __future__ import annotations

import errno
import json
import os

import pandas as pd
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import piggyback_interp.core.io as pio
from piggyback_interp.core.errors import DiskError, UserError


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


WRITERS = {
    "text": (lambda p: pio.atomic_write_text(p, "new"), lambda p: p.read_text("utf-8")),
    "bytes": (lambda p: pio.atomic_write_bytes(p, b"new"), lambda p: p.read_bytes()),
    "json": (lambda p: pio.write_json(p, {"new": 1}), lambda p: json.loads(p.read_text())),
    "parquet": (
        lambda p: pio.atomic_write_parquet(pd.DataFrame({"a": [1, 2]}), p),
        lambda p: pd.read_parquet(p)["a"].tolist(),
    ),
    "torch": (
        lambda p: pio.atomic_torch_save({"w": torch.arange(3)}, p),
        lambda p: torch.load(p, weights_only=True)["w"].tolist(),
    ),
    "safetensors": (
        lambda p: pio.atomic_save_safetensors({"w": torch.arange(3)}, p),
        lambda p: load_file(p)["w"].tolist(),
    ),
}
EXPECTED = {
    "text": "new",
    "bytes": b"new",
    "json": {"new": 1},
    "parquet": [1, 2],
    "torch": [0, 1, 2],
    "safetensors": [0, 1, 2],
}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_writers_round_trip_and_fsync_before_the_rename(kind, tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1]
    )
    write, read = WRITERS[kind]
    path = tmp_path / "sub" / f"out.{kind}"
    assert write(path) == path
    assert read(path) == EXPECTED[kind]
    assert _names(path.parent) == [path.name]
    # the file's data reaches the disk before the rename, the folder's entry after it
    assert events == ["fsync", "replace", "fsync"]


def _fail_midway(exc):
    """A writer body that writes half a file, then fails with ``exc``."""

    def body(path):
        with pio.atomic_open(path, "wb") as handle:
            handle.write(b"half of the new")
            raise exc

    return body


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("boom"), KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")],
    ids=["error", "ctrl-c", "disk-full"],
)
def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(exc, tmp_path):
    path = tmp_path / "result.bin"
    path.write_bytes(b"old")
    with pytest.raises(type(exc)) as caught:
        _fail_midway(exc)(path)
    assert path.read_bytes() == b"old"
    assert _names(tmp_path) == ["result.bin"]
    if isinstance(exc, OSError):  # a full disk: DiskError (exit 4), errno kept, the real name
        assert isinstance(caught.value, DiskError)
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)


def _disk_fills_after(limit, monkeypatch):
    """Files opened by the atomic writers take ``limit`` bytes, then raise ENOSPC."""
    real_open = open

    class Filling:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            if self.written + len(data) > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(pio, "open", lambda *a, **k: Filling(real_open(*a, **k)), raising=False)


def test_torch_save_on_a_full_disk_keeps_errno(tmp_path, monkeypatch):
    """torch.save reports a failed write as "unexpected pos": the errno comes back."""
    path = tmp_path / "checkpoint.pt"
    pio.atomic_torch_save({"step": 1}, path)
    _disk_fills_after(200, monkeypatch)
    with pytest.raises(DiskError) as caught:
        pio.atomic_torch_save({"w": torch.zeros(10_000)}, path)
    assert caught.value.errno == errno.ENOSPC and str(path) in str(caught.value)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert _names(tmp_path) == ["checkpoint.pt"]


def test_safetensors_on_a_full_disk_keeps_errno(tmp_path, monkeypatch):
    """safetensors raises SafetensorError("... (os error 28)"): a DiskError with errno 28."""
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    path = tmp_path / "w.safetensors"
    pio.atomic_save_safetensors({"w": torch.ones(2)}, path)
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(DiskError) as caught:
        pio.atomic_save_safetensors({"w": torch.zeros(2)}, path)
    assert caught.value.errno == errno.ENOSPC
    assert load_file(path)["w"].tolist() == [1.0, 1.0]
    assert _names(tmp_path) == ["w.safetensors"]


def test_other_os_errors_keep_their_subclass_and_name_the_file(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/some/.tmp")

    monkeypatch.setattr(pio, "open", refuse, raising=False)
    path = tmp_path / "x.txt"
    with pytest.raises(PermissionError) as caught:
        pio.atomic_write_text(path, "x")
    assert caught.value.filename == str(path) and not isinstance(caught.value, DiskError)
    assert _names(tmp_path) == []


def test_atomic_files_moves_whole_files_and_keeps_others(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "README.md").write_text("mine")
    (out / "config.json").write_text("old")
    with pytest.raises(SafetensorError), pio.atomic_files(out) as staging:
        (staging / "config.json").write_text("new")
        raise SafetensorError("Error while serializing: something else")
    assert (out / "config.json").read_text() == "old"
    assert _names(tmp_path) == ["model"]
    with pio.atomic_files(out) as staging:
        (staging / "config.json").write_text("new")
        (staging / "sub").mkdir()
        (staging / "sub" / "w.bin").write_bytes(b"w")
    assert (out / "config.json").read_text() == "new" and (out / "sub" / "w.bin").is_file()
    assert (out / "README.md").read_text() == "mine"
    assert _names(tmp_path) == ["model"]


def test_atomic_files_on_a_full_disk(tmp_path):
    with pytest.raises(DiskError) as caught, pio.atomic_files(tmp_path / "adapter") as staging:
        (staging / "adapter_model.safetensors").write_bytes(b"part")
        raise SafetensorError("I/O error: No space left on device (os error 28)")
    assert caught.value.errno == errno.ENOSPC
    assert _names(tmp_path) == []


@pytest.mark.parametrize("damage", ["a third", "half", "all but the end", "empty", "garbage"])
def test_a_damaged_checkpoint_is_a_user_error_naming_the_file_and_the_fix(damage, tmp_path):
    path = tmp_path / "checkpoint.pt"
    pio.atomic_torch_save({"values": torch.zeros(1000)}, path)
    data = path.read_bytes()
    cut = {"a third": len(data) // 3, "half": len(data) // 2, "all but the end": len(data) - 9}
    damaged = {"empty": b"", "garbage": b"x" * 99}.get(damage)
    path.write_bytes(damaged if damaged is not None else data[: cut[damage]])
    with pytest.raises(UserError) as caught:
        pio.load_checkpoint(path, redo="this sweep")
    message = str(caught.value)
    assert str(path) in message and "delete it" in message and "redo this sweep" in message
    assert isinstance(caught.value, pio.CorruptCheckpointError)


def test_the_sweep_checkpoint_write_fails_cleanly(tmp_path, monkeypatch):
    """The hand-rolled writer this replaced left ``.sweep.ckpt.tmp`` behind."""
    path = tmp_path / "sweep.ckpt"
    pio.save_checkpoint(path, {"a": 1}, torch.zeros(2, 3), {0})
    real = torch.save

    def half(obj, f, *args, **kwargs):  # f: a path (the old writer) or a file
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as handle:
                handle.write(b"PK\x03\x04 half a zip")
        else:
            f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half)
    with pytest.raises(OSError) as caught:
        pio.save_checkpoint(path, {"a": 1}, torch.ones(2, 3), {0, 1})
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.setattr(torch, "save", real)
    assert _names(tmp_path) == ["sweep.ckpt"]
    assert torch.load(path, weights_only=True)["done"].tolist() == [0]


def test_old_import_paths_still_work():
    from piggyback_interp.core.provenance import atomic_write_parquet, atomic_write_text
    from piggyback_interp.core.runs import write_json

    assert atomic_write_text is pio.atomic_write_text
    assert atomic_write_parquet is pio.atomic_write_parquet
    assert write_json is pio.write_json


def test_docstring_example_runs():
    import doctest

    assert doctest.testmod(pio, optionflags=doctest.ELLIPSIS).failed == 0
