"""Run directories (cached, resumable steps) and config files, against hand-written files."""

import doctest
import json
import re
import time
from pathlib import Path

import pytest

import piggyback_interp.core.runs as runs_module
from piggyback_interp.core.errors import UserError
from piggyback_interp.core.runs import (
    STARTED_FILE,
    STEP_FILE,
    ConfigFileError,
    RunDir,
    StaleStepError,
    fingerprint,
    load_config,
    read_json,
    write_json,
)

KEY = {"model": "tiny", "lr": 0.001, "layers": [0, 1]}


def _counting():
    """A step body that counts its calls and writes which call it was."""
    calls = []

    def compute(folder):
        calls.append(folder)
        time.sleep(0.02)
        (folder / "out.txt").write_text(f"call {len(calls)}")

    return calls, compute


# ------------------------------------------------------------- RunDir.step


def test_a_step_runs_once_per_key(tmp_path):
    run = RunDir(tmp_path / "runs" / "a")  # parents are created
    calls, compute = _counting()
    folder = run.step("train", KEY, compute)
    assert folder == tmp_path / "runs" / "a" / "train" and calls == [folder]
    timing = run.timings["train"]
    assert timing["cached"] is False and timing["seconds"] >= 0.02
    record = json.loads((folder / STEP_FILE).read_text())
    assert record["step"] == "train" and record["key"] == KEY
    assert record["fingerprint"] == fingerprint(KEY) and record["seconds"] == timing["seconds"]
    assert "torch" in record["versions"]

    # the same key (in another order), even from a new RunDir on the folder: cached
    again = RunDir(tmp_path / "runs" / "a")
    same = {"layers": [0, 1], "lr": 0.001, "model": "tiny"}
    assert again.finished("train", same)
    assert again.step("train", same, compute) == folder
    assert len(calls) == 1 and (folder / "out.txt").read_text() == "call 1"
    assert again.timings["train"] == {"seconds": timing["seconds"], "cached": True}

    # steps are independent; "/" in a name makes sub-folders
    sub = run.step("sweeps/layer0", KEY, compute)
    assert sub == run.path / "sweeps" / "layer0" and len(calls) == 2
    assert run.step("sweeps/layer0", KEY, compute) == sub and len(calls) == 2
    assert set(run.timings) == {"train", "sweeps/layer0"}


def test_another_key_is_refused_unless_overwrite(tmp_path):
    calls, compute = _counting()
    RunDir(tmp_path).step("train", KEY, compute)
    other = {**KEY, "lr": 0.01, "epochs": 2}
    with pytest.raises(StaleStepError, match=r"changed: epochs, lr\).*--overwrite") as err:
        RunDir(tmp_path).step("train", other, compute)
    assert err.value.changed == ["epochs", "lr"]
    assert len(calls) == 1 and (tmp_path / "train" / "out.txt").read_text() == "call 1"
    assert RunDir(tmp_path).finished("train", KEY)  # nothing finished was deleted

    run = RunDir(tmp_path, overwrite=True)
    (tmp_path / "train" / "old-output.txt").write_text("of the old inputs")
    seen = []

    def recompute(folder):
        seen.append(sorted(p.name for p in folder.iterdir()))
        compute(folder)

    assert run.step("train", other, recompute) == tmp_path / "train"
    assert seen == [[STARTED_FILE]]  # redone in an emptied folder
    assert len(calls) == 2 and run.timings["train"]["cached"] is False
    assert run.finished("train", other) and not run.finished("train", KEY)
    run.step("train", other, compute)  # overwrite does not redo a step of the same key
    assert len(calls) == 2 and run.timings["train"]["cached"] is True


def test_a_failed_step_leaves_no_record_and_is_redone(tmp_path):
    run = RunDir(tmp_path)
    attempts = []

    def boom(folder):
        attempts.append(sorted(p.name for p in folder.iterdir()))
        (folder / "partial.txt").write_text("half")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        run.step("s", KEY, boom)
    assert not (tmp_path / "s" / STEP_FILE).exists() and not run.finished("s", KEY)
    assert "s" not in run.timings
    with pytest.raises(RuntimeError, match="out of memory"):
        run.step("s", KEY, boom)  # the same key: tried again, and finds its leftovers
    assert attempts == [[STARTED_FILE], ["partial.txt", STARTED_FILE]]

    calls, compute = _counting()
    run.step("s", KEY, compute)
    assert len(calls) == 1 and run.finished("s", KEY)
    assert (tmp_path / "s" / "partial.txt").exists()  # resumable steps keep their checkpoints
    # a step that failed with other inputs is stale too
    with pytest.raises(RuntimeError):
        run.step("t", KEY, boom)
    with pytest.raises(StaleStepError, match="changed: lr"):
        run.step("t", {**KEY, "lr": 1.0}, compute)


def test_fresh_empties_the_folder_first_but_keeps_a_finished_step(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "s" / "nested").mkdir(parents=True)
    (tmp_path / "s" / "stale.txt").write_text("from an interrupted run")
    (tmp_path / "s" / "nested" / "ckpt.bin").write_bytes(b"0")
    seen = []
    run.step("s", KEY, lambda folder: seen.append(sorted(folder.iterdir())), fresh=True)
    assert seen == [[tmp_path / "s" / STARTED_FILE]]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted([STARTED_FILE, STEP_FILE])
    # finished with this key: fresh=True does not redo (nor empty) it
    calls, compute = _counting()
    run.step("s", KEY, compute, fresh=True)
    assert calls == [] and run.timings["s"]["cached"] is True


def test_run_folder_errors_and_repr(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=r"cannot create the run folder.*a file is in the way"):
        RunDir(blocker / "run")
    assert repr(RunDir(tmp_path)) == f"RunDir({str(tmp_path)!r})"
    assert RunDir(tmp_path).folder("a/b") == tmp_path / "a" / "b"
    assert not RunDir(tmp_path).finished("never", KEY)


def test_fingerprint():
    fp = fingerprint(KEY)
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert fp == fingerprint(dict(reversed(list(KEY.items()))))  # key order does not matter
    assert fp != fingerprint({**KEY, "lr": 0.002})
    assert fp != fingerprint({**KEY, "layers": [1, 0]})  # list order does
    # non-JSON values count by their str()
    assert fingerprint({"path": Path("/m/tiny")}) == fingerprint({"path": "/m/tiny"})


# ------------------------------------------------------------- JSON files


def test_write_json_read_json_round_trip(tmp_path):
    data = {"b": [1, 2.5, None, True], "a": {"nested": "ü"}, "path": Path("/x")}
    path = write_json(tmp_path / "deep" / "er" / "data.json", data)
    assert path == tmp_path / "deep" / "er" / "data.json"
    text = path.read_text("utf-8")
    assert text.endswith("\n") and text.index('"a"') < text.index('"b"')  # sorted, indented
    assert '\n  "a"' in text
    assert read_json(path) == {**data, "path": "/x"}  # non-JSON values as str
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.json"]  # no temp files
    assert read_json(tmp_path / "missing.json") is None
    assert read_json(tmp_path / "missing.json", default={"x": 1}) == {"x": 1}
    assert read_json(tmp_path / "deep", default=[]) == []  # a folder is not a file


# ------------------------------------------------------------- config files

EXPECTED = {"model": "tiny", "lora_rank": 8, "lr": 0.001, "layers": [0, 1], "quiet": True}
CONFIGS = {
    "c.toml": 'model = "tiny"\nlora-rank = 8\nlr = 0.001\nlayers = [0, 1]\nquiet = true\n',
    "c.yaml": "model: tiny\nlora-rank: 8\nlr: 0.001\nlayers: [0, 1]\nquiet: true\n",
    "c.yml": "model: tiny\nlora_rank: 8\nlr: 0.001\nlayers:\n  - 0\n  - 1\nquiet: yes\n",
    "c.json": '{"model": "tiny", "lora-rank": 8, "lr": 0.001, "layers": [0, 1], "quiet": true}',
    "C.TOML": 'model = "tiny"\nlora_rank = 8\nlr = 1e-3\nlayers = [0, 1]\nquiet = true\n',
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_load_config_formats_agree(tmp_path, name):
    path = tmp_path / name
    path.write_text(CONFIGS[name])
    assert load_config(path) == EXPECTED
    assert load_config(str(path)) == EXPECTED


def test_load_config_reads_back_write_json(tmp_path):
    path = write_json(tmp_path / "config.json", EXPECTED)
    assert load_config(path) == EXPECTED


def test_load_config_keys_only_top_level_dashes(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('top-key = 1\n[some-table]\ninner-key = "a-b"\n')
    assert load_config(path) == {"top_key": 1, "some_table": {"inner-key": "a-b"}}


def test_empty_yaml_is_an_empty_mapping(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path) == {}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.toml", "model = \n", "is not valid TOML"),
        ("bad.yaml", "model: [unclosed\n", "is not valid YAML"),
        ("bad.json", "{model: tiny}", "is not valid JSON"),
        ("empty.json", "", "is not valid JSON"),
        ("list.json", "[1, 2]", "must hold a mapping of option = value"),
        ("list.yaml", "- a\n- b\n", "must hold a mapping of option = value"),
        ("empty-list.yaml", "[]\n", "must hold a mapping of option = value"),
        ("scalar.yml", "tiny\n", "must hold a mapping of option = value"),
        ("c.ini", "[a]\nb = 1\n", "unknown format '.ini'; use .toml, .yaml, .yml or .json"),
        ("noext", "a = 1\n", "unknown format ''"),
    ],
)
def test_load_config_errors_name_the_file(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigFileError, match=re.escape(message)) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_load_config_missing_file(tmp_path):
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigFileError, match=re.escape(f"config file {path} does not exist")):
        load_config(path)
    with pytest.raises(ConfigFileError, match="does not exist"):
        load_config(tmp_path)  # a folder


def test_docstring_example_runs():
    result = doctest.testmod(runs_module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 5


def test_write_record_is_the_one_run_json(tmp_path):
    import time

    from piggyback_interp.core.runs import RunDir

    run = RunDir(tmp_path / "run")
    run.timings["a"] = {"seconds": 1.5, "cached": False}
    path = run.write_record("demo", time.perf_counter(), "then", config={"x": 1})
    record = json.loads(path.read_text())
    assert path.name == "run.json" and record["command"] == "demo" and record["config"] == {"x": 1}
    assert record["compute_seconds"] == 1.5 and record["started"] == "then"
    assert {"wall_seconds", "finished", "versions", "machine", "steps"} <= set(record)


def test_one_duration_formatter():
    from piggyback_interp.report.html import duration

    assert [duration(s) for s in (4.23, 37, 723, 7500, None)] == [
        "4.2 s", "37 s", "12 min 3 s", "2 h 5 min", "unknown",
    ]  # fmt: skip
