"""Where a patch takes its values from: a model, or activations taken before.

Every patch and sweep accepts either a source MODEL (the base; it runs on the prompts
being patched) or fixed :class:`~piggyback_interp.interventions.activations.Activations`
(taken before: by :func:`~piggyback_interp.interventions.activations.capture`, an ablation
or noise control of :mod:`~piggyback_interp.interventions.controls`, ``load_pair(...,
reference=...)``). :func:`as_source` turns either (or a
:class:`~piggyback_interp.interventions.generation.PatchSpec`, for its source) into a
:class:`Source`, so callers ask it for values instead of branching on its type.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.core.spans import batch_spans
    >>> from piggyback_interp.interventions import capture
    >>> base, ft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    >>> batch = batch_spans(ft.tokenizer, ["Hi"])
    >>> as_source(base)
    ModelSource('tiny-llama-L2-seed0')
    >>> fixed = as_source(capture(base, batch, "prefix", site="kv"))
    >>> fixed.model is None, fixed.label
    (True, 'activations')
    >>> fixed.activations(ft, batch, "prefix", site="k", layers=[0]).sites
    ('k',)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from piggyback_interp.core.models import model_info
from piggyback_interp.core.spans import ChatBatch, require_segment, with_empty_query
from piggyback_interp.interventions.activations import Activations, SegmentOrPositions, capture

Site = str | Sequence[str] | None
Layers = int | Iterable[int] | None


@runtime_checkable
class Source(Protocol):
    """What a patch takes its values from.

    ``model`` is the model that runs (``None`` for fixed values: they have no metric
    of their own); ``label`` names the source in results' metadata.
    """

    @property
    def model(self) -> Any | None: ...

    @property
    def label(self) -> str: ...

    def activations(
        self,
        target: Any,
        batch: ChatBatch,
        segment: SegmentOrPositions | None,
        *,
        site: Site = None,
        layers: Layers = None,
        postfix_reference: bool = False,
    ) -> Activations:
        """The values to write into ``target`` at ``segment`` of ``batch`` (fixed values
        ignore both: they were taken for them before): ``site``
        (``None``: a model's ``"kv"``, or every site the activations hold) at ``layers``.
        ``postfix_reference``: a model takes the postfix from the empty-query prompt
        (the paper's reference), as :func:`~piggyback_interp.patch_prefix` does."""
        ...


@dataclass(frozen=True)
class ModelSource:
    """A model that runs on the prompts (for the postfix reference: on the empty-query prompt)."""

    model: Any

    def __repr__(self) -> str:  # not the model's whole module tree
        return f"ModelSource({self.label!r})"

    @property
    def label(self) -> str:
        return model_info(self.model).name

    def activations(
        self,
        target: Any,
        batch: ChatBatch,
        segment: SegmentOrPositions | None,
        *,
        site: Site = None,
        layers: Layers = None,
        postfix_reference: bool = False,
    ) -> Activations:
        if postfix_reference and segment == "postfix":
            require_segment(batch.spans[0], "postfix")
            reference = with_empty_query(batch.spans[0])  # its values serve every row
            return capture(self.model, reference, "postfix", site=site or "kv", layers=layers)
        return capture(self.model, batch, segment, site=site or "kv", layers=layers)


@dataclass(frozen=True)
class FixedSource:
    """Activations taken before (a capture, an ablation, noise): written as they are."""

    values: Activations
    model: None = None

    def __repr__(self) -> str:
        return f"FixedSource(sites={self.values.sites}, layers={list(self.values.layers)})"

    @property
    def label(self) -> str:
        return "activations"

    def activations(
        self,
        target: Any,
        batch: ChatBatch,
        segment: SegmentOrPositions | None,
        *,
        site: Site = None,
        layers: Layers = None,
        postfix_reference: bool = False,
    ) -> Activations:
        return self.values.select(target, site, layers)


def as_source(source: Any) -> Source:
    """A :class:`Source` for a loaded model, :class:`Activations`, a ``PatchSpec`` (its
    source) or a :class:`Source` (as it is).

    Raises TypeError for anything else (a model's name, say: load it first)."""
    if isinstance(source, ModelSource | FixedSource):
        return source
    if isinstance(source, Activations):
        return FixedSource(source)
    from piggyback_interp.interventions.generation import PatchSpec  # generation builds on patching

    if isinstance(source, PatchSpec):
        return as_source(source.source)
    if not isinstance(source, str) and hasattr(source, "hooks"):
        return ModelSource(source)
    raise TypeError(
        f"a patch source must be a loaded model or Activations, got {type(source).__name__}; "
        "load it first (load_model(...))"
    )


__all__ = ["FixedSource", "ModelSource", "Source", "as_source"]
