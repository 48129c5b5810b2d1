"""Patching: activations at template positions, patches as context managers, sweeps."""

from piggyback_interp.patching.activations import (
    Activations,
    as_batch,
    capture,
    forward,
    segment_positions,
)
from piggyback_interp.patching.heads import head_sweep, kv_head_sweep
from piggyback_interp.patching.patch import (
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
    "head_sweep",
    "kv_head_sweep",
    "patch_activations",
    "patch_prefix",
    "segment_positions",
]
