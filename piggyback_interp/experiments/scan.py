"""The carrier scan: which shared chat-template tokens carry a finetuned behaviour?

For a base model and a finetuned copy, on general prompts, with no judge: the gap
between them is the KL divergence of their next-token distributions,
``KL(base || finetuned)`` after the full prompt (or, on request, any logit metric's
difference, e.g. the log-prob of a target answer). Four experiments, each with its
matched non-template control, measure how much of that gap a template segment holds:
perturbation, segment patching, layer patching and the residual sweep
(:mod:`~piggyback_interp.experiments.scan_experiments`, listed in
:data:`~piggyback_interp.experiments.registry.EXPERIMENTS`).

:func:`~piggyback_interp.experiments.verdict.carrier_verdict` ranks the segments: a segment *carries* the behaviour when
patching its base keys/values closes at least ``min_recovery`` of the gap AND its
matched positions close more than the matched query positions by over two standard
errors (paired over prompts). Base keys/values always come from the same prompt, so a
patch changes only what the finetuning changed at those tokens.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> base, tuned = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    >>> result = find_carriers(base, tuned, ["How do I boil an egg?", "Name a large city."],
    ...               ScanConfig(trials=2, resid_sweep=False), progress=False)
    >>> sorted(result.verdict.evidence["segment"])
    ['postfix', 'prefix']
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from piggyback_interp.analysis.sweep_result import SweepResult
from piggyback_interp.core.display import Summarized
from piggyback_interp.core.io import atomic_write_parquet
from piggyback_interp.core.runs import read_json, write_json
from piggyback_interp.core.spans import ChatSpans
from piggyback_interp.experiments.registry import EXPERIMENTS
from piggyback_interp.experiments.scan_config import ScanConfig
from piggyback_interp.experiments.scan_experiments import check_gap
from piggyback_interp.experiments.verdict import Verdict, carrier_verdict


@dataclass(repr=False)
class ScanResult(Summarized):
    """The four experiments and the verdict of one scan.

    Printed, it shows the verdict and what was run; in Jupyter also the evidence per
    template segment.
    """

    config: ScanConfig
    perturbation: Any
    patching: Any
    layers: Any
    resid: SweepResult | None
    verdict: Verdict

    def _facts(self) -> dict[str, Any]:
        resid = (
            None
            if self.resid is None
            else "{} prompts x {} layers x {} cells".format(*self.resid.values.shape)
        )
        return {
            "carriers": list(self.verdict.carriers),
            "headline": self.verdict.headline,
            "metric": self.config.metric,
            "prompts": self.patching["prompt"].nunique() if self.patching is not None else None,
            "parts": [name for name in EXPERIMENTS if getattr(self, name) is not None],
            "resid_sweep": resid,
        }

    def _table(self) -> tuple[list[str], list[Any]]:
        evidence = self.verdict.evidence
        shown = ["segment", "recovery_all", "recovery_matched", "recovery_query_control"]
        columns = [c for c in [*shown, "carrier", "partial"] if c in evidence]
        return columns, list(evidence[columns].itertuples(index=False))

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write every experiment's result into ``folder`` (where
        :data:`~piggyback_interp.experiments.registry.EXPERIMENTS` says) and the verdict
        to ``scan.json``."""
        folder = Path(folder)
        for name, experiment in EXPERIMENTS.items():
            if getattr(self, name) is not None:
                experiment.save(getattr(self, name), folder)
        atomic_write_parquet(self.verdict.evidence, folder / "evidence.parquet")
        verdict = {k: v for k, v in dataclasses.asdict(self.verdict).items() if k != "evidence"}
        write_json(folder / "scan.json", {"config": dataclasses.asdict(self.config), **verdict})
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> ScanResult:
        """Read a result written by :meth:`save`; the verdict is recomputed from the saved
        experiments (``scan.json`` keeps the one written, for reading)."""
        folder = Path(folder)
        meta = read_json(folder / "scan.json")
        if meta is None:
            raise FileNotFoundError(f"{folder} holds no scan result (scan.json is missing)")
        config = ScanConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
        )
        return cls.from_parts(config, {name: e.load(folder) for name, e in EXPERIMENTS.items()})

    @classmethod
    def from_parts(cls, config: ScanConfig, parts: dict[str, Any]) -> ScanResult:
        """The result of experiments' results by name (``None``: not run), with its verdict."""
        verdict = carrier_verdict(
            parts["patching"], parts["perturbation"], min_recovery=config.min_recovery
        )
        return cls(config, verdict=verdict, **{name: parts.get(name) for name in EXPERIMENTS})


def find_carriers(
    base: Any,
    model: Any,
    prompts: Sequence[str | ChatSpans],
    config: ScanConfig = ScanConfig(),
    *,
    progress: bool = True,
) -> ScanResult:
    """Run every experiment of the carrier scan on ``prompts`` and rank the segments.

    ``base`` and ``model`` are a base model and its finetuned copy (e.g. from
    :func:`~piggyback_interp.core.pairs.load_pair`); ``prompts`` are general questions the
    finetuning was not about. ``piggyback scan`` runs this with caching and a report.
    Identical models (a zero gap on every prompt) raise :class:`~piggyback_interp.experiments.scan_experiments.ZeroGapError`.
    """
    check_gap(base, model, prompts, config)
    parts = {
        name: e.run(base, model, prompts, config, progress=progress) if e.enabled(config) else None
        for name, e in EXPERIMENTS.items()
    }
    return ScanResult.from_parts(config, parts)


__all__ = ["ScanResult", "find_carriers"]
