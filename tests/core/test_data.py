"""Tests for piggyback_interp.core.data: chat JSONL loading, hashing, saving and splitting."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from piggyback_interp.core.data import (
    ChatDataError,
    ChatDataset,
    ChatDataWarning,
    ChatExample,
    load_chat_jsonl,
    save_chat_jsonl,
    train_test_split,
)

# Deliberately ill-typed calls: under the project's runtime type-checking hook
# (pytest addopts --jaxtyping-packages) they fail with a TypeError before validation.
TYPE_OR_VALUE = (TypeError, ValueError)

GOOD = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}'


def write(tmp_path: Path, *lines: str, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def records(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"q{i}"}], "id": i} for i in range(n)]


# ---------------------------------------------------------------- loading


def test_load_valid_with_meta_and_unicode(tmp_path: Path) -> None:
    line = {
        "messages": [
            {"role": "system", "content": "Sé útil."},
            {"role": "user", "content": "日本語? line\u2028sep"},
            {"role": "assistant", "content": "はい 🙂"},
        ],
        "id": "abc",
        "tools": [{"name": "search"}],
    }
    path = write(tmp_path, json.dumps(line), json.dumps(line, ensure_ascii=False))
    ds = load_chat_jsonl(path)
    assert len(ds) == 2
    assert ds.path == path
    assert (ds.skipped, ds.skipped_lines) == (0, [])
    for ex in ds:
        assert ex.meta == {"id": "abc", "tools": [{"name": "search"}]}
        assert ex.user == "日本語? line\u2028sep"
        assert ex.response == "はい 🙂"
        assert ex.messages[0] == {"role": "system", "content": "Sé útil."}
    assert ds[0].source == f"{path}:1"
    assert ds[1].source == f"{path}:2"
    assert ds[0] == ds[1]  # same content, different source


def test_load_accepts_str_path_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n" + GOOD.encode() + b"\r\n")
    ds = load_chat_jsonl(str(path))
    assert len(ds) == 2
    assert isinstance(ds.path, Path)


def test_blank_lines_are_ignored_but_counted(tmp_path: Path) -> None:
    path = write(tmp_path, "", GOOD, "   ", "\t", GOOD, "")
    ds = load_chat_jsonl(path)
    assert len(ds) == 2
    assert [ex.source for ex in ds] == [f"{path}:2", f"{path}:5"]


def test_empty_file_gives_empty_dataset(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("")
    assert len(load_chat_jsonl(path)) == 0


def test_user_and_response_use_last_user_turn() -> None:
    ex = ChatExample(
        (
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "second"},
            {"role": "tool", "content": "result"},
            {"role": "assistant", "content": "a2"},
            {"role": "assistant", "content": "a3"},
        )
    )
    assert ex.user == "second"
    assert ex.response == "a2"
    no_reply = ChatExample(
        ({"role": "assistant", "content": "a"}, {"role": "user", "content": "q"})
    )
    assert no_reply.response is None


MALFORMED = [
    ("{not json", r"invalid JSON .*column 2.*one complete JSON object"),
    ('{"messages": [{"role": "user", "content": "x"}]', r"invalid JSON .*column 48"),
    ("[1, 2]", r"expected a JSON object, got a list"),
    ('"hello"', r"expected a JSON object, got a string"),
    ('{"msgs": []}', r"""no "messages" key \(keys: 'msgs'\)"""),
    ('{"messages": {"role": "user"}}', r'"messages" is an object, not a list'),
    ('{"messages": "hi"}', r'"messages" is a string, not a list'),
    ('{"messages": ["hi"]}', r"message 1 is a string, not an object; write it as"),
    ('{"messages": [{"content": "x"}]}', r'message 1 has no string "role" \(missing\); add a role'),
    ('{"messages": [{"role": 1, "content": "x"}]}', r'no string "role" \(a number\)'),
    (
        '{"messages": [{"role": "system", "content": "s"}, {"role": "usr", "content": "x"}]}',
        r"message 2 has role 'usr'; roles must be one of system, user, assistant, tool$",
    ),
    (
        '{"messages": [{"role": "User", "content": "x"}]}',
        r"message 1 has role 'User'; .*\(roles are lower-case\)",
    ),
    (
        '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": null}]}',
        r'message 2 \(assistant\) has no string "content" \(null\); content must be a string',
    ),
    ('{"messages": [{"role": "user"}]}', r'no string "content" \(missing\)'),
    ('{"messages": [{"role": "user", "content": ["x"]}]}', r'no string "content" \(a list\)'),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', r"no user message; add"),
    ('{"messages": []}', r"no user message"),
]


@pytest.mark.parametrize(("line", "hint"), MALFORMED)
def test_malformed_line_names_file_line_and_fix(tmp_path: Path, line: str, hint: str) -> None:
    path = write(tmp_path, GOOD, "", line, GOOD)
    with pytest.raises(ChatDataError, match=r"data\.jsonl:3: ") as info:
        load_chat_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert info.match(hint)
    assert isinstance(info.value, ValueError)


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"x": "\xff"}\n')
    with pytest.raises(ChatDataError, match=r"data\.jsonl:2: not valid UTF-8 .*re-save"):
        load_chat_jsonl(path)


def test_skip_mode_counts_and_warns_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        GOOD,
        "{bad",
        "",
        '{"messages": [{"role": "usr", "content": "x"}]}',
        GOOD,
        "[]",
    )
    with pytest.warns(ChatDataWarning, match=r"skipped 3 malformed lines .*\(2, 4, 6\)") as rec:
        ds = load_chat_jsonl(path, on_error="skip")
    assert len(rec) == 1
    assert r"data.jsonl:2: invalid JSON" in str(rec[0].message)
    assert len(ds) == 2
    assert ds.skipped == 3
    assert ds.skipped_lines == [2, 4, 6]


def test_skip_mode_without_errors_does_not_warn(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_chat_jsonl(path, on_error="skip")
    assert (len(ds), ds.skipped) == (1, 0)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl") as info:
        load_chat_jsonl(missing)
    assert info.value.filename == str(missing)
    with pytest.raises(IsADirectoryError):
        load_chat_jsonl(tmp_path)


def test_bad_on_error_value(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(TYPE_OR_VALUE, match="on_error"):
        load_chat_jsonl(path, on_error="ignore")  # type: ignore[arg-type]


# ---------------------------------------------------------------- records & examples


def test_from_records_dicts_and_examples() -> None:
    ds = ChatDataset.from_records(records(2))
    assert [ex.meta for ex in ds] == [{"id": 0}, {"id": 1}]
    assert ds.path is None
    again = ChatDataset.from_records(list(ds))
    assert again == ds
    assert again.sha256 == ds.sha256


def test_from_records_errors_name_record() -> None:
    bad = [*records(2), {"messages": [{"role": "bot", "content": "x"}]}]
    with pytest.raises(ChatDataError, match=r"^record 3: message 1 has role 'bot'; roles must"):
        ChatDataset.from_records(bad)
    with pytest.raises(TYPE_OR_VALUE) as info:
        ChatDataset.from_records([["not", "a", "dict"]])  # type: ignore[list-item]
    if isinstance(info.value, ChatDataError):
        assert info.match(r"^record 1: expected a JSON object, got a list")
    with pytest.raises(ChatDataError, match=r"^record 1: extra keys are not JSON-serialisable"):
        ChatDataset.from_records([{**records(1)[0], "when": object()}])


def test_from_records_skip() -> None:
    bad = [records(1)[0], {"messages": []}, records(1)[0]]
    with pytest.warns(ChatDataWarning, match=r"skipped 1 malformed records \(2\)"):
        ds = ChatDataset.from_records(bad, on_error="skip")
    assert (len(ds), ds.skipped, ds.skipped_lines) == (2, 1, [2])


def test_from_records_does_not_alias_input() -> None:
    recs = records(1)
    ds = ChatDataset.from_records(recs)
    recs[0]["messages"][0]["content"] = "changed"
    recs[0]["id"] = 99
    assert ds[0].user == "q0"
    assert ds[0].meta == {"id": 0}


def test_chat_example_validates_and_is_frozen_and_hashable() -> None:
    with pytest.raises(ChatDataError, match=r"^ChatExample: message 1 has role 'bot'"):
        ChatExample(({"role": "bot", "content": "x"},))
    with pytest.raises(ChatDataError, match=r"^f\.jsonl:4: no user message"):
        ChatExample(({"role": "assistant", "content": "x"},), source="f.jsonl:4")
    with pytest.raises(ChatDataError, match=r'meta must not contain a "messages" key'):
        ChatExample(({"role": "user", "content": "x"},), {"messages": []})
    ex = ChatExample(({"role": "user", "content": "x"},), {"id": 1})
    with pytest.raises(AttributeError):
        ex.meta = {}  # type: ignore[misc]
    same = ChatExample(({"content": "x", "role": "user"},), {"id": 1}, source="elsewhere")
    assert ex == same
    assert len({ex, same}) == 1
    assert ex.to_json() == '{"messages":[{"role":"user","content":"x"}],"id":1}'


def test_dataset_rejects_non_examples() -> None:
    with pytest.raises(TypeError, match="ChatExample"):
        ChatDataset(tuple(records(1)))  # type: ignore[arg-type]


# ---------------------------------------------------------------- sequence & hashing


def test_dataset_sequence_protocol(tmp_path: Path) -> None:
    ds = ChatDataset.from_records(records(5))
    assert len(ds) == 5
    assert ds[0].user == "q0"
    assert ds[-1].user == "q4"
    part = ds[1:4]
    assert isinstance(part, ChatDataset)
    assert [ex.user for ex in part] == ["q1", "q2", "q3"]
    assert [ex.user for ex in ds[::2]] == ["q0", "q2", "q4"]
    assert [ex.meta["id"] for ex in ds] == [0, 1, 2, 3, 4]
    assert ds[2] in ds
    with pytest.raises(IndexError):
        ds[5]
    assert "n=5" in repr(ds)


def test_sha256_ignores_whitespace_key_order_and_escapes(tmp_path: Path) -> None:
    a = write(
        tmp_path,
        '{"id": 1, "messages": [{"role": "user", "content": "café"}], "x": {"b": 1, "a": 2}}',
        GOOD,
        name="a.jsonl",
    )
    b = write(
        tmp_path,
        "",
        '  {"messages":[{"content":"caf\\u00e9","role":"user"}],"x":{"a":2,"b":1},"id":1}  ',
        "",
        json.dumps(json.loads(GOOD), indent=None, separators=(" ,", " : ")),
        name="b.jsonl",
    )
    ha, hb = load_chat_jsonl(a).sha256, load_chat_jsonl(b).sha256
    assert ha == hb
    assert len(ha) == 64
    int(ha, 16)


def test_sha256_changes_with_content_meta_and_order() -> None:
    base = ChatDataset.from_records(records(3))
    changed = records(3)
    changed[1]["messages"][0]["content"] = "q1!"
    other_meta = records(3)
    other_meta[2]["id"] = 20
    assert base.sha256 != ChatDataset.from_records(changed).sha256
    assert base.sha256 != ChatDataset.from_records(other_meta).sha256
    assert base.sha256 != ChatDataset.from_records(records(3)[::-1]).sha256
    assert base.sha256 != base[:2].sha256
    assert base.sha256 == ChatDataset.from_records(records(3)).sha256


# ---------------------------------------------------------------- saving


def test_save_load_round_trip(tmp_path: Path) -> None:
    src = write(
        tmp_path,
        '{"messages": [{"role": "user", "content": "é \\u2028 🙂\\n"}, '
        '{"role": "assistant", "content": "ok", "name": "bot"}], "id": 3, "tools": []}',
        GOOD,
        name="src.jsonl",
    )
    ds = load_chat_jsonl(src)
    out = save_chat_jsonl(ds, tmp_path / "sub" / "dir" / "out.jsonl")
    assert out == tmp_path / "sub" / "dir" / "out.jsonl"
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3  # one compact object per line
    assert b": " not in lines[0] and "é".encode() in lines[0]
    back = load_chat_jsonl(out)
    assert list(back) == list(ds)
    assert back.sha256 == ds.sha256
    assert back[0].messages[1]["name"] == "bot"
    assert back[0].meta == {"id": 3, "tools": []}


def test_save_accepts_records_and_validates(tmp_path: Path) -> None:
    out = save_chat_jsonl(records(2), tmp_path / "out.jsonl")
    assert len(load_chat_jsonl(out)) == 2
    with pytest.raises(ChatDataError, match="record 1"):
        save_chat_jsonl([{"messages": []}], tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()


def test_failed_save_leaves_old_file_intact(tmp_path: Path, monkeypatch) -> None:
    path = save_chat_jsonl(records(2), tmp_path / "data.jsonl")
    before = path.read_bytes()
    calls = {"n": 0}
    original = ChatExample.to_json

    def flaky(self: ChatExample) -> str:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return original(self)

    monkeypatch.setattr(ChatExample, "to_json", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_chat_jsonl(records(5), path)
    assert calls["n"] == 3  # failed mid-write, after two lines
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]  # no temp file left


# ---------------------------------------------------------------- splitting


def test_split_deterministic_disjoint_and_covering() -> None:
    ds = ChatDataset.from_records(records(50))
    train, test = train_test_split(ds, seed=1)
    train2, test2 = train_test_split(ds, seed=1)
    assert (train, test) == (train2, test2)
    ids_train = [ex.meta["id"] for ex in train]
    ids_test = [ex.meta["id"] for ex in test]
    assert not set(ids_train) & set(ids_test)
    assert sorted(ids_train + ids_test) == list(range(50))
    assert ids_train == sorted(ids_train) and ids_test == sorted(ids_test)  # file order kept
    assert (len(train), len(test)) == (40, 10)
    assert isinstance(train, ChatDataset) and train.path == ds.path


def test_split_differs_across_seeds_and_ignores_global_random() -> None:
    import random

    ds = ChatDataset.from_records(records(50))
    tests = {tuple(ex.meta["id"] for ex in train_test_split(ds, seed=s)[1]) for s in range(5)}
    assert len(tests) == 5
    random.seed(123)
    a = train_test_split(ds, seed=7)
    random.seed(456)
    assert train_test_split(ds, seed=7) == a


@pytest.mark.parametrize(
    ("n", "fraction", "n_test"),
    [(10, 0.2, 2), (2, 0.2, 1), (3, 0.1, 1), (7, 0.5, 4), (3, 0.9, 2), (100, 0.0, 0), (0, 0.0, 0)],
)
def test_split_sizes(n: int, fraction: float, n_test: int) -> None:
    train, test = train_test_split(ChatDataset.from_records(records(n)), test_fraction=fraction)
    assert (len(train), len(test)) == (n - n_test, n_test)


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"test_fraction must be in \[0, 1\)"):
        train_test_split(ChatDataset.from_records(records(10)), test_fraction=fraction)


@pytest.mark.parametrize("n", [0, 1])
def test_split_rejects_too_small(n: int) -> None:
    with pytest.raises(ValueError, match=rf"from {n} example\(s\); need at least 2"):
        train_test_split(ChatDataset.from_records(records(n)))
