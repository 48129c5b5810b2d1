"""The public surface: every exported name resolves; importing has no side effects."""

import subprocess
import sys

import piggyback_interp


def test_every_public_name_resolves():
    for name in piggyback_interp.__all__:
        assert getattr(piggyback_interp, name) is not None, name
    assert set(piggyback_interp.__all__) <= set(dir(piggyback_interp))


def test_unknown_name_raises_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = piggyback_interp.nope


def test_import_is_lazy_and_silent():
    code = (
        "import sys, piggyback_interp;"
        "assert 'transformer_lens' not in sys.modules, 'transformer_lens imported eagerly';"
        "assert 'torch' not in sys.modules, 'torch imported eagerly'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
