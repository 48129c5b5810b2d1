"""Layer x position patching sweeps: :func:`sweep` picks the engine for a site.

For every cell (layer ``l``, segment position ``i``) the sweep patches the source's
activation at that one site into the target and reads a metric. Residual sites run
on the residual engine (:mod:`~piggyback_interp.analysis.resid_engine`), key/value
and head sites on the K/V and head engine (:mod:`~piggyback_interp.analysis.kv_engine`),
and ``engine="loop"`` on :func:`~piggyback_interp.analysis.reference.reference_sweep`,
the obvious loop the engines must match. Results are
:class:`~piggyback_interp.analysis.sweep_result.SweepResult`.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.core.spans import batch_spans
    >>> from piggyback_interp.measures.metrics import TargetLogProb
    >>> base, ft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    >>> batch = batch_spans(ft.tokenizer, ["Tell me a joke.", "Hi"])
    >>> result = sweep(ft, base, batch, TargetLogProb("I have no idea"), progress=False)
    >>> result.values.shape == (2, ft.cfg.n_layers, len(batch.spans[0].prefix))
    True
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any

from piggyback_interp.analysis.atp import atp_sweep
from piggyback_interp.analysis.kv_engine import engine_sweep
from piggyback_interp.analysis.reference import loop_sweep
from piggyback_interp.analysis.resid_engine import SWEEP_SITES, resid_sweep
from piggyback_interp.analysis.sweep_result import SweepResult
from piggyback_interp.core.checks import Choice
from piggyback_interp.core.hooks import KV_SITES, expand_sites
from piggyback_interp.core.spans import ChatBatch, ChatSpans
from piggyback_interp.interventions.activations import SegmentOrPositions
from piggyback_interp.measures.metrics import LogitMetric


class Engine(Choice):
    """How a sweep runs its cells: ``batched`` (many cells per forward) or ``loop`` (one
    patched full forward per cell: the reference, slow)."""

    BATCHED = "batched"
    LOOP = "loop"


class SweepMethod(Choice):
    """``exact``: patch every cell; ``atp``: estimate every cell by attribution patching."""

    EXACT = "exact"
    ATP = "atp"


def sweep(
    model: Any,
    source: Any,
    spans: ChatSpans | ChatBatch,
    metric: LogitMetric,
    *,
    site: str = "resid_pre",
    layers: int | Iterable[int] | None = None,
    segment: SegmentOrPositions = "prefix",
    cells_per_batch: int = 8,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
    method: SweepMethod | str = SweepMethod.EXACT,
    engine: Engine | str = Engine.BATCHED,
) -> SweepResult:
    """Patch ``site`` of ``source`` into ``model`` one (layer, position) cell at a time.

    Args:
        model: the target (finetuned) model.
        source: the source (base) model, or :class:`Activations` of ``site`` at
            ``segment`` for ``layers`` (e.g. from ``load_pair(..., reference=...)``).
        spans: the prompts (``batch_spans``). With ``align="prefix"`` and a prefix
            segment, the prefix is patched and run once per cell and only the rest
            of each prompt runs per prompt (faster; same values).
        metric: a :class:`~piggyback_interp.measures.metrics.LogitMetric`.
        site: ``resid_pre`` | ``resid_mid`` | ``resid_post`` | ``attn_out`` | ``mlp_out``
            run on the residual engine; ``kv`` | ``k`` | ``v`` | ``z`` (every head) on
            the batched K/V and head engine (:mod:`~piggyback_interp.analysis.kv_engine`;
            K/V cells isolated as in :func:`patch_prefix`). For whole-prefix K/V layer
            windows use :func:`kv_layer_sweep`, for single heads :func:`head_sweep` and
            :func:`kv_head_sweep`.
        layers: the layers to sweep (default all).
        segment: the positions to sweep: a segment name or explicit positions.
        cells_per_batch: how many positions share one forward (rows = this x prompts).
        checkpoint: a file to record finished layers in; a rerun with the same
            arguments resumes from it.
        progress: show a progress bar.
        method: ``"exact"`` patches every cell; ``"atp"`` estimates every cell from one
            forward and one backward (:func:`~piggyback_interp.analysis.atp.atp_sweep`;
            ``cells_per_batch``, ``checkpoint``, ``engine`` and ``progress`` do not apply).
        engine: ``"batched"`` (the engines) or ``"loop"``
            (:func:`~piggyback_interp.analysis.reference.reference_sweep`, one full
            forward per cell: the oracle, slow). The K/V and head engine keeps no
            checkpoint.
    """
    engine = Engine.parse(engine, "engine")
    if SweepMethod.parse(method, "method") is SweepMethod.ATP:
        return atp_sweep(model, source, spans, metric, site=site, layers=layers, segment=segment)
    sites = expand_sites(site)
    if engine is Engine.BATCHED and (set(sites) <= set(KV_SITES) or sites == ("z",)):
        if checkpoint is not None:
            warnings.warn(
                "the batched K/V and head engine keeps no checkpoint; pass engine='loop' "
                "(slower) to record finished layers",
                stacklevel=2,
            )
        return engine_sweep(
            model, source, spans, metric, site=site, layers=layers, segment=segment,
            cells_per_batch=cells_per_batch, progress=progress,
        )  # fmt: skip
    if engine is Engine.LOOP or len(sites) != 1 or sites[0] not in SWEEP_SITES:
        return loop_sweep(
            model, source, spans, metric, site=site, layers=layers, segment=segment,
            checkpoint=checkpoint,
        )  # fmt: skip
    return resid_sweep(
        model, source, spans, metric, site=sites[0], layers=layers, segment=segment,
        cells_per_batch=cells_per_batch, checkpoint=checkpoint, progress=progress,
    )  # fmt: skip


__all__ = ["Engine", "SweepMethod", "sweep"]
