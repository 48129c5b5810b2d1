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


def test_type_checking_imports_match_the_lazy_exports():
    """The TYPE_CHECKING block (for IDEs) names exactly the lazily exported names."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(piggyback_interp))
    block = next(
        n
        for n in tree.body
        if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"
    )
    imported = {
        (node.module, alias.name)
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert imported == {(module, name) for name, module in piggyback_interp._EXPORTS.items()}


def test_no_public_name_is_shadowed_by_a_submodule():
    """Importing a submodule sets a package attribute of its name: none may be public."""
    import importlib
    import pkgutil
    import types

    for info in pkgutil.walk_packages(piggyback_interp.__path__, "piggyback_interp."):
        importlib.import_module(info.name)
    for name in piggyback_interp.__all__:
        assert not isinstance(getattr(piggyback_interp, name), types.ModuleType), name


def test_versions_name_every_library():
    from importlib.metadata import version

    from piggyback_interp.provenance import versions

    found = versions()
    assert found["transformer_lens"] == version("transformer-lens")  # not "unknown"
    assert all(v and v != "unknown" for v in found.values())
