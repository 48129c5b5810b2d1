"""Interventions: what is done to a model's run.

Activations at template positions (``activations``), patches as context managers
(``patch``), the sources a patch takes its values from (``sources``), matched controls
(``controls``), segment perturbations (``perturb``) and patched generation
(``generation``). The sweeps that repeat a patch over many cells are in
:mod:`piggyback_interp.analysis`.
"""

from piggyback_interp.interventions.activations import (
    Activations,
    as_batch,
    capture,
    forward,
    segment_positions,
)
from piggyback_interp.interventions.patch import (
    check_tokens,
    empty_query_batch,
    patch_activations,
    patch_prefix,
)

__all__ = [
    "Activations",
    "as_batch",
    "capture",
    "check_tokens",
    "empty_query_batch",
    "forward",
    "patch_activations",
    "patch_prefix",
    "segment_positions",
]
