"""Module boundaries, checked on the source (``ast``), not by convention.

* **Private names stay private.** No module of ``piggyback_interp`` imports a name with
  a leading underscore (dunders aside) from another module of the package, nor reads
  one as ``module._name``. A helper two modules share is public in the module that
  owns its concept.
* **Hook names live in** ``piggyback_interp/core/hooks.py``. No other module spells a
  TransformerLens hook name (``blocks.{layer}.hook_resid_pre``,
  ``blocks.{layer}.attn.hook_k``, ``ln_final.hook_normalized``, ...) in a string;
  docstrings may show them.
* **Hugging Face internals live in** ``piggyback_interp/core/hf.py``. The names in
  :data:`HF_INTERNALS` are the parts of the HF model and cache that a
  ``TransformerBridge`` hides: the wrapped HF model (``original_model``), its decoder
  internals (``rotary_emb``, ``self_attn``, ``lm_head``, ``get_input_embeddings``,
  ``generation_config``), the KV cache (``DynamicCache``, ``past_key_values``,
  ``cache_position``, ``batch_repeat_interleave``) and the bridge's wrapper of an HF
  layer (``_original_component``). Each is used as code (an attribute, a name, a
  keyword argument, an import) only in ``hf.py``. Not listed, because they are public
  loading APIs, not internals: ``from_pretrained``, ``save_pretrained``, peft's
  ``PeftModel`` / ``get_peft_model`` (models.py, pairs.py, placement.py, training/lora.py and
  task_vectors read adapters with them), and HF parameter-name strings such as
  ``"model.layers.3.self_attn.q_proj.weight"`` (task vectors are keyed by them). Too
  generic to check by name, yet also reached only through ``hf.py``: a cache's
  ``layers`` / ``keys`` / ``values`` (``hf.cache_layers``) and ``model.layers``.
  models.py and placement.py, the loaders, still read accelerate's ``hf_device_map``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import piggyback_interp

PACKAGE = Path(piggyback_interp.__file__).parent
HOOKS = PACKAGE / "core" / "hooks.py"
HF = PACKAGE / "core" / "hf.py"

HOOK_NAME = re.compile(r"(?:^|\.)blocks\.|hook_[a-z]|ln_final")
"""A piece of a hook name: ``blocks.`` (every per-layer hook starts so, also as an
f-string piece), ``hook_<site>`` (``hook_resid_pre``, ``attn.hook_z``) or ``ln_final``."""

HF_INTERNALS = frozenset(
    {
        "original_model",
        "_original_component",
        "rotary_emb",
        "self_attn",
        "lm_head",
        "get_input_embeddings",
        "generation_config",
        "DynamicCache",
        "past_key_values",
        "cache_position",
        "batch_repeat_interleave",
    }
)


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _dotted(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_package_module(dotted: str) -> bool:
    relative = Path(*dotted.split(".")[1:]) if "." in dotted else Path()
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative).is_dir()


def _imported_from(node: ast.ImportFrom, path: Path) -> str | None:
    """The absolute module of ``from X import ...`` (relative imports resolved)."""
    if node.level == 0:
        return node.module
    package = _dotted(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of the module, its classes and functions, and of
    the strings that document an assignment (a bare string right after it)."""
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for stmt in body:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                out.add(id(stmt.value))
    return out


def _parse(path: Path, text: str | None) -> ast.AST:
    return ast.parse(path.read_text() if text is None else text, str(path))


def private_imports(path: Path, text: str | None = None) -> list[str]:
    """``module:line name`` for every private name ``path`` takes from another module."""
    tree = _parse(path, text)
    here = _dotted(path)
    found: list[str] = []
    aliases: dict[str, str] = {}  # local name -> package module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _imported_from(node, path)
            if not source or not source.startswith("piggyback_interp") or source == here:
                continue
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {alias.name}")
                elif _is_package_module(f"{source}.{alias.name}"):
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("piggyback_interp") and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and aliases[node.value.id] != here
            and _private(node.attr)
        ):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.attr}")
    return found


def hook_name_strings(path: Path, text: str | None = None) -> list[str]:
    """``module:line 'string'`` for every code string that spells a piece of a hook name."""
    tree = _parse(path, text)
    docs = _docstrings(tree)
    return [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docs
        and HOOK_NAME.search(node.value)
    ]


def hf_internals(path: Path, text: str | None = None) -> list[str]:
    """``module:line name`` for every use of a name in :data:`HF_INTERNALS`."""
    tree = _parse(path, text)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.Name):
            names = [node.id]
        elif (isinstance(node, ast.keyword) and node.arg) or isinstance(node, ast.arg):
            names = [node.arg]
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names = [alias.name.rsplit(".", 1)[-1] for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in {
            "getattr",
            "hasattr",
            "setattr",
        }:
            names = [
                a.value
                for a in node.args[1:2]
                if isinstance(a, ast.Constant) and isinstance(a.value, str)
            ]
        lineno = getattr(node, "lineno", 0)
        found += [
            f"{path.relative_to(PACKAGE.parent)}:{lineno} {n}" for n in names if n in HF_INTERNALS
        ]
    return found


def test_no_module_imports_a_private_name_from_another():
    found = [hit for path in _modules() for hit in private_imports(path)]
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_hook_names_are_spelled_only_in_hooks():
    found = [hit for path in _modules() if path != HOOKS for hit in hook_name_strings(path)]
    assert not found, "hook names outside hooks.py:\n" + "\n".join(found)


def test_hf_internals_are_reached_only_from_hf():
    found = [hit for path in _modules() if path != HF for hit in hf_internals(path)]
    assert not found, "Hugging Face internals outside hf.py:\n" + "\n".join(found)


def test_the_checks_see_what_they_look_for():
    """Each check finds a planted violation (so a green run means something)."""
    planted = PACKAGE / "interventions" / "planted.py"  # never written: the text is passed in
    text = (
        "from piggyback_interp.interventions.generation import _prefix_groups\n"
        "from ..analysis import sweep as s\n"
        "from . import patch\n"
        "from .planted import _mine\n"
        "x = s._fingerprint, patch._hook, s.__name__\n"
        'name = f"blocks.{0}.attn.hook_z"\n'
        "y = model.original_model.config\n"
        "z = getattr(model, 'generation_config', None)\n"
        "def f(past_key_values=None):\n"
        '    """blocks.0.hook_resid_pre in a docstring is fine"""\n'
    )
    assert [h.split()[-1] for h in private_imports(planted, text)] == [
        "_prefix_groups",
        "_fingerprint",
        "_hook",
    ]
    assert [h.split(" ", 1)[-1] for h in hook_name_strings(planted, text)] == [
        "'blocks.'",
        "'.attn.hook_z'",
    ]
    assert sorted(h.split()[-1] for h in hf_internals(planted, text)) == [
        "generation_config",
        "original_model",
        "past_key_values",
    ]


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def too_long(path: Path, text: str) -> list[str]:
    """A module over :data:`MAX_MODULE_LINES` lines, and each function over
    :data:`MAX_FUNCTION_LINES` lines whose docstring gives no reason (a line starting
    ``Long because``)."""
    found = []
    lines = text.count("\n") + (not text.endswith("\n"))
    if lines > MAX_MODULE_LINES:
        found.append(f"{path.relative_to(PACKAGE)}: {lines} lines")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            doc = ast.get_docstring(node) or ""
            reason = any(line.strip().startswith("Long because") for line in doc.splitlines())
            if length > MAX_FUNCTION_LINES and not reason:
                found.append(
                    f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {length} lines"
                )
    return found


def test_no_module_or_function_is_too_long():
    found = [hit for path in _modules() for hit in too_long(path, path.read_text("utf-8"))]
    assert not found, "too long:\n" + "\n".join(found)


def test_the_length_check_sees_what_it_looks_for():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    long_function = f"def f():\n{body}"
    excused = f'def g():\n    """Long because: a table.\n    """\n{body}'
    planted = PACKAGE / "interventions" / "planted.py"  # never written: the text is passed in
    assert [h.split()[-3] for h in too_long(planted, long_function + excused)] == ["f:"]
    padding = "\n" * MAX_MODULE_LINES
    assert too_long(planted, padding + "x = 1\n") == [
        f"interventions/planted.py: {MAX_MODULE_LINES + 1} lines"
    ]
