"""A griffe extension for the API reference: reads this project's docstrings as written.

The docstrings are Google style with two habits griffe does not read by itself:

* Sphinx roles (``:func:`patch_prefix```, ``:class:`~piggyback_interp.core.spans.ChatBatch```):
  each becomes a cross-reference to the object's API page when the name resolves to an
  object the reference renders, otherwise plain code, so a role never breaks the build.
* ``Example:`` (singular) sections: griffe reads only ``Examples:`` as doctest code. An
  ``Example:`` whose body starts with ``>>>`` is read as ``Examples:``; one whose body is
  shell text (``$ piggyback ...``) becomes a fenced console block.

Only the docstrings griffe holds in memory change; the source files are untouched.
Loaded by mkdocstrings (``extensions:`` in ``mkdocs.yml``).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(func|class|meth|mod|data|attr|exc|obj|const|type):`([^`]+)`")
_TITLED = re.compile(r"^(.*?)\s*<(.+)>$")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$")
ROOT = Path(__file__).resolve().parent.parent


def _lookup(root: Any, path: str) -> Any | None:
    """The object at dotted ``path`` under package ``root`` (aliases followed), or None."""
    if path != root.path and not path.startswith(root.path + "."):
        return None
    obj = root
    for part in path.removeprefix(root.path).lstrip(".").split(".") if path != root.path else []:
        try:
            obj = obj.members[part]
            if obj.is_alias:
                obj = obj.final_target
        except Exception:
            return None
    return obj


def _rendered(obj: Any) -> bool:
    """Whether the API reference renders ``obj``: public, in public modules, all the way up.

    The same rule as ``filters: public`` and the package pages of ``gen_api.py``.
    """
    node = obj
    while node is not None:
        if node.is_module:
            if node.name.startswith("_"):
                return False
        elif not node.is_public or (node.parent.is_module and node.name.startswith("_")):
            return False
        node = node.parent
    return True


def _resolve(root: Any, scope: Any, target: str) -> str | None:
    """The canonical path ``target`` names, seen from ``scope``, if it is rendered."""
    target = target.lstrip(".")
    candidates = [target]
    node = scope
    while node is not None:
        candidates.append(f"{node.path}.{target}")
        node = node.parent
    for candidate in candidates:
        obj = _lookup(root, candidate)
        if obj is not None and _rendered(obj):
            return obj.path
    return None


def _convert_roles(text: str, root: Any, scope: Any) -> str:
    def replace(match: re.Match[str]) -> str:
        content = match.group(2).strip()
        titled = _TITLED.match(content)
        if titled:
            title, target = titled.group(1), titled.group(2)
        else:
            short = content.startswith("~")
            target = content.lstrip("~")
            title = target.rsplit(".", 1)[-1] if short else target
        if match.group(1) in ("func", "meth") and not title.endswith(")"):
            title += "()"
        path = _resolve(root, scope, target.lstrip("~"))
        return f"[`{title}`][{path}]" if path else f"`{title}`"

    return _ROLE.sub(replace, text)


def _convert_examples(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _EXAMPLE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match.group(1)
        end = i + 1
        while end < len(lines) and (
            not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > len(indent)
        ):
            end += 1
        body = lines[i + 1 : end]
        first = next((line.strip() for line in body if line.strip()), "")
        if first.startswith(">>>"):
            out.append(f"{indent}Examples:")
            out += body
        elif first.startswith("$ "):
            inner = textwrap.dedent("\n".join(body)).strip("\n").splitlines()
            pad = indent + "    "
            out.append(lines[i])
            out += [f"{pad}```console", *(pad + line if line else "" for line in inner)]
            out += [f"{pad}```", ""]
        else:
            out += [lines[i], *body]
        i = end
    return "\n".join(out)


class ProjectDocstrings(griffe.Extension):
    """Rewrite roles and ``Example:`` sections once the whole package is loaded."""

    def on_package(self, *, pkg: Any, **kwargs: Any) -> None:
        filepath = pkg.filepath[0] if isinstance(pkg.filepath, list) else pkg.filepath
        if Path(filepath).resolve().is_relative_to(ROOT):  # this project's code only
            self._walk(pkg, pkg)

    def _walk(self, root: Any, obj: Any) -> None:
        if obj.docstring is not None:
            text = _convert_examples(obj.docstring.value)
            obj.docstring.value = _convert_roles(text, root, obj)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(root, member)
