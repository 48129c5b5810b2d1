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

    from piggyback_interp.core.provenance import versions

    found = versions()
    assert found["transformer_lens"] == version("transformer-lens")  # not "unknown"
    assert all(v and v != "unknown" for v in found.values())


def _pyproject() -> dict:
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())


def test_build_floor_supports_the_license_fields():
    """An SPDX `license` string and `license-files` need setuptools >= 77 (PEP 639)."""
    from packaging.requirements import Requirement

    config = _pyproject()
    assert isinstance(config["project"]["license"], str)
    (setuptools,) = [
        Requirement(r) for r in config["build-system"]["requires"] if r.startswith("setuptools")
    ]
    assert not setuptools.specifier.contains("76.9"), setuptools


def test_wheel_ships_license_metadata_and_data(tmp_path):
    """Build the wheel from a copy of the sources (no build/ debris in the checkout)."""
    import shutil
    import zipfile
    from pathlib import Path

    root = Path(__file__).parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(root / name, src / name)
    shutil.copytree(
        root / "piggyback_interp",
        src / "piggyback_interp",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*cmd, "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("piggyback_interp-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(f"{info}/METADATA").decode()
        license_text = archive.read(f"{info}/licenses/LICENSE").decode()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "License-Expression: Apache-2.0" in metadata
    assert "Project-URL: Paper, https://arxiv.org/abs/2606.06667" in metadata
    assert "Classifier: Intended Audience :: Science/Research" in metadata
    assert any(line.startswith("Requires-Dist: filelock") for line in metadata.splitlines())
    assert "piggyback_interp/py.typed" in names
    settings = Path("piggyback_interp/core/data/settings")
    for data in sorted((root / settings).glob("*.t[sx][vt]")):
        assert (settings / data.name).as_posix() in names
