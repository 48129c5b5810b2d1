"""MkDocs hooks for this site (``hooks:`` in ``mkdocs.yml``)."""

from __future__ import annotations

from mkdocs.plugins import event_priority
from mkdocs.structure.files import Files, InclusionLevel


@event_priority(-200)  # after mkdocs-literate-nav (-100) has read the nav files
def on_files(files: Files, config: object) -> Files:
    """The generated ``SUMMARY.md`` nav files are navigation, not pages: do not build them."""
    for file in files:
        if file.src_uri.endswith("SUMMARY.md"):
            file.inclusion = InclusionLevel.EXCLUDED
    return files
