"""What a carrier scan runs: :class:`ScanConfig`, and the gap it measures (:class:`GapMetric`)."""

from __future__ import annotations

from dataclasses import dataclass

from piggyback_interp.core.checks import Choice, at_least, choices
from piggyback_interp.core.errors import UserError
from piggyback_interp.interventions.perturb import PerturbMode

TEMPLATE_SEGMENTS = ("prefix", "postfix")


class GapMetric(Choice):
    """The gap: ``kl`` = KL(base || finetuned) of the next token; ``target`` = the difference
    in log-prob of ``ScanConfig.target``."""

    KL = "kl"
    TARGET = "target"


METRICS = GapMetric.values()


@dataclass(frozen=True)
class ScanConfig:
    """What a carrier scan runs (recorded next to its results).

    Each field's docstring is also its ``piggyback scan --help`` text.
    """

    segments: tuple[str, ...] = TEMPLATE_SEGMENTS
    """the template segments tested as carriers"""
    metric: GapMetric | str = GapMetric.KL
    """the gap: kl (KL(base || finetuned) of the next token) or target (the difference in
    log-prob of target)"""
    target: str | None = None
    """the text metric=target scores (e.g. the trained answer)"""
    trials: int = 5
    """random perturbations per prompt and segment"""
    perturb_mode: PerturbMode | str = PerturbMode.NEAREST
    """nearest: each perturbed token becomes one of its nearest embedding neighbours;
    random: a uniformly random token"""
    layers: tuple[int, ...] | None = None
    """the layers of the per-layer experiments (none: all)"""
    resid_sweep: bool = True
    """run the residual-stream sweep (layer x prefix position)"""
    min_recovery: float = 0.25
    """the share of the gap a segment's base keys/values must close to carry the behaviour"""
    seed: int = 0
    """seed of the perturbations"""
    resid_atp_top_k: int | None = 64
    """rank every residual-sweep cell by attribution patching and patch only the top k
    exactly (default 64 of the 720 cells of a 30-layer model; none: every cell exactly,
    about 8x slower on the embedded model)"""

    def __post_init__(self) -> None:
        bad = [s for s in self.segments if s not in TEMPLATE_SEGMENTS]
        if bad or not self.segments:
            raise UserError(
                f"segments must be template segments among {TEMPLATE_SEGMENTS}, got {self.segments}"
            )
        choices(self, metric=GapMetric, perturb_mode=PerturbMode)
        if self.metric is GapMetric.TARGET and not self.target:
            raise UserError("metric='target' needs target='the answer text to score'")
        at_least(self, 1, "trials")
        if not 0 < self.min_recovery <= 1:
            raise UserError(f"min_recovery must be in (0, 1], got {self.min_recovery}")
        if self.resid_atp_top_k is not None and self.resid_atp_top_k < 0:
            raise UserError(f"resid_atp_top_k must be >= 0, got {self.resid_atp_top_k}")


__all__ = ["METRICS", "TEMPLATE_SEGMENTS", "GapMetric", "ScanConfig"]
