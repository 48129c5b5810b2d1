"""Generate the API reference (``api/**.md``): one mkdocstrings page per public module.

Run by mkdocs-gen-files at build time (see ``mkdocs.yml``). The package is walked on
disk, so a module added later gets its page without any change here; private modules
(``_name.py``) and private packages are skipped.

Packages re-export names from their modules (the top-level package lazily, PEP 562).
Each name is documented once, on the page of the module that defines it; a package's
page shows its own docstring and members plus a table of the names it exports, each
linked to its definition. griffe reads the source statically, so nothing heavy
(torch, TransformerLens) is imported at build time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE = "piggyback_interp"
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ModulePage:
    """A public module and the page that documents it."""

    name: str  # dotted
    is_package: bool

    @property
    def path(self) -> str:
        parts = self.name.split(".")
        if self.is_package:
            return "api/" + "/".join(parts) + "/index.md"
        return "api/" + "/".join(parts) + ".md"


def public_modules(root: Path = ROOT, package: str = PACKAGE) -> list[ModulePage]:
    """Every public module of ``package`` under ``root``, packages before their modules."""
    found = []
    for file in sorted((root / package).rglob("*.py")):
        parts = list(file.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts):  # private modules, __main__
            continue
        if is_package or (file.parent / "__init__.py").exists():
            found.append(ModulePage(".".join(parts), is_package))
    return sorted(found, key=lambda m: m.name.split("."))


def _exports(package: Any) -> list[tuple[str, str, bool]]:
    """(name, defining object's path, rendered?) of what a griffe package re-exports.

    ``__all__`` when griffe can read it, else every public alias into the project
    (the top-level package lists its lazy exports under ``if TYPE_CHECKING``).
    """
    members = package.members
    names = [n for n in (package.exports or []) if n in members]
    if not names:
        names = [n for n, m in members.items() if m.is_alias and not n.startswith("_")]
    out = []
    for name in names:
        member = members[name]
        if not member.is_alias:
            continue
        try:
            target = member.final_target
        except Exception:  # an external or unresolvable import
            continue
        if target.path.startswith(PACKAGE + "."):
            out.append((name, target.path, _rendered(target)))
    return out


def _rendered(obj: Any) -> bool:
    """Whether the reference renders ``obj``: public, in public modules, all the way up."""
    while obj is not None:
        if obj.is_module:
            if obj.name.startswith("_"):
                return False
        elif not obj.is_public or (obj.parent.is_module and obj.name.startswith("_")):
            return False
        obj = obj.parent
    return True


def _own_members(module: Any) -> list[str]:
    """Public names a module defines itself (not imports), in source order."""
    members = module.members
    return [
        name
        for name, member in members.items()
        if not member.is_alias
        and not member.is_module
        and not name.startswith("_")
        and member.is_public
    ]


def _module_of(path: str, modules: set[str]) -> str:
    while path not in modules and "." in path:
        path = path.rsplit(".", 1)[0]
    return path


def render_page(page: ModulePage, griffe_module: Any, modules: set[str]) -> str:
    """The markdown of one module's page."""
    lines = [f"::: {page.name}"]
    if page.is_package:
        own = _own_members(griffe_module)
        lines += ["    options:", f"      members: {own if own else 'false'}"]
        exports = _exports(griffe_module)
        if exports:
            lines += [
                "",
                f"## Names exported by `{page.name}`",
                "",
                "Each is documented where it is defined.",
                "",
                "| name | defined in |",
                "| --- | --- |",
            ]
            for name, target, rendered in exports:
                module = _module_of(target, modules)
                if rendered and module in modules:
                    lines.append(f"| [`{name}`][{target}] | [`{module}`][{module}] |")
                else:  # defined in a private module: not in the reference
                    lines.append(f"| `{name}` | `{target.rsplit('.', 1)[0]}` |")
    return "\n".join(lines) + "\n"


def render_pages(root: Path = ROOT) -> dict[str, str]:
    """``{path: markdown}`` for every public module, plus ``api/SUMMARY.md``."""
    import griffe

    pages = public_modules(root)
    loaded = griffe.load(PACKAGE, search_paths=[str(root)], resolve_aliases=True)
    names = {page.name for page in pages}
    out = {}
    for page in pages:
        obj = (
            loaded[page.name.removeprefix(PACKAGE).lstrip(".")] if page.name != PACKAGE else loaded
        )
        out[page.path] = render_page(page, obj, names)
    nav = []
    for page in pages:  # the top-level package first, its modules beside it (not under it)
        depth = max(page.name.count(".") - 1, 0)
        link = page.path.removeprefix("api/")
        title = page.name if page.name == PACKAGE else page.name.rsplit(".", 1)[-1]
        nav.append(f"{'    ' * depth}* [{title}]({link})")
    out["api/SUMMARY.md"] = "\n".join(nav) + "\n"
    return out


def main() -> None:
    import mkdocs_gen_files

    for path, text in render_pages().items():
        with mkdocs_gen_files.open(path, "w") as f:
            f.write(text)


if __name__ in {"__main__", "<run_path>"}:  # mkdocs-gen-files runs scripts via runpy
    main()
