"""The one list of the carrier scan's experiments: what each runs, what keys its cache,
where its result lives.

:func:`~piggyback_interp.experiments.scan.find_carriers`, :class:`ScanResult`'s save
and load, the cached steps of :mod:`~piggyback_interp.experiments.pipeline` (and through
them ``piggyback scan``, ``perturb``, ``patch`` and ``sweep``) all read
:data:`EXPERIMENTS`. To add an experiment: write its function in
:mod:`~piggyback_interp.experiments.scan_experiments` and add one entry here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from piggyback_interp.analysis.sweep_result import SweepResult
from piggyback_interp.core.io import atomic_write_parquet
from piggyback_interp.experiments.scan_config import ScanConfig
from piggyback_interp.experiments.scan_experiments import (
    layer_patching,
    perturbation_effects,
    residual_sweep,
    segment_patching,
)


def _always(config: ScanConfig) -> bool:
    return True


def _read_frame(path: Path) -> Any:
    import pandas as pd

    return pd.read_parquet(path)


@dataclass(frozen=True)
class Experiment:
    """One experiment of the carrier scan.

    ``run(base, model, prompts, config, *, progress[, checkpoint])`` computes it;
    ``fields`` are the :class:`ScanConfig` fields its result depends on (its cache key);
    ``path`` is where its result lives inside a scan folder and ``read`` reads it back;
    ``resumable`` experiments take a ``checkpoint`` file; ``enabled(config)`` says
    whether a scan runs it.
    """

    name: str
    run: Callable[..., Any]
    fields: frozenset[str]
    path: str
    resumable: bool = False
    enabled: Callable[[ScanConfig], bool] = _always
    read: Callable[[Path], Any] = _read_frame

    def save(self, value: Any, folder: str | os.PathLike[str]) -> Path:
        """Write a result (a frame, or a :class:`SweepResult`) under the scan ``folder``."""
        path = Path(folder) / self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, SweepResult):
            return value.save(path)
        return atomic_write_parquet(value, path)

    def load(self, folder: str | os.PathLike[str]) -> Any:
        """Read what :meth:`save` wrote under ``folder``; ``None`` when it was not run."""
        path = Path(folder) / self.path
        return self.read(path) if path.exists() else None


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in [
        Experiment(
            "perturbation",
            perturbation_effects,
            frozenset({"segments", "metric", "target", "trials", "perturb_mode", "seed"}),
            "perturbation/perturbation.parquet",
        ),
        Experiment(
            "patching",
            segment_patching,
            frozenset({"segments", "metric", "target", "seed"}),
            "patching/patching.parquet",
        ),
        Experiment(
            "layers",
            layer_patching,
            frozenset({"segments", "metric", "target", "layers"}),
            "layers/layers.parquet",
            resumable=True,
        ),
        Experiment(
            "resid",
            residual_sweep,
            frozenset({"metric", "target", "layers", "resid_atp_top_k"}),
            "resid/resid_sweep.parquet",
            resumable=True,
            enabled=lambda config: config.resid_sweep,
            read=SweepResult.load,
        ),
    ]
}
"""The scan's experiments by name, in the order a scan runs them."""

__all__ = ["EXPERIMENTS", "Experiment"]
