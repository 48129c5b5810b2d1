"""The one place that spells TransformerLens hook names.

A :class:`HookSite` is an activation site ("k", "v", "resid_pre", ...) with its
hook-name template and its tensor layout (which axis is position, which is head).
Everything else in the toolkit asks this module for names and layouts.

Keys are what attention really uses: on a model with a key norm (Qwen3) the
``k`` site is the normed key (``attn.hook_k_normed``, laid out
``[batch, head, pos, d_head]``), elsewhere ``attn.hook_k`` (``[batch, pos, head,
d_head]``). Both are before RoPE, which is a per-position rotation: a key moved to
another position is rotated for its new place by the model itself.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.core.hooks import resolve_site
    >>> resolve_site(tiny_model("qwen3"), "k").name(3)
    'blocks.3.attn.hook_k_normed'
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from piggyback_interp.core.errors import UserError

SITE_NAMES = ("k", "v", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z")
COMPOSITE_SITES = {"kv": ("k", "v")}
KV_SITES = ("k", "v")


@dataclass(frozen=True)
class HookSite:
    """An activation site: the hook-name template and where position and head live."""

    site: str
    template: str
    pos_dim: int = 1
    head_dim: int | None = None

    def name(self, layer: int) -> str:
        """The hook name at ``layer``."""
        return self.template.format(layer=layer)

    @property
    def per_head(self) -> bool:
        return self.head_dim is not None


_TEMPLATES: dict[str, HookSite] = {
    "k": HookSite("k", "blocks.{layer}.attn.hook_k", 1, 2),
    "k_normed": HookSite("k", "blocks.{layer}.attn.hook_k_normed", 2, 1),
    "v": HookSite("v", "blocks.{layer}.attn.hook_v", 1, 2),
    "z": HookSite("z", "blocks.{layer}.attn.hook_z", 1, 2),
    "resid_pre": HookSite("resid_pre", "blocks.{layer}.hook_resid_pre"),
    "resid_mid": HookSite("resid_mid", "blocks.{layer}.hook_resid_mid"),
    "resid_post": HookSite("resid_post", "blocks.{layer}.hook_resid_post"),
    "attn_out": HookSite("attn_out", "blocks.{layer}.hook_attn_out"),
    "mlp_out": HookSite("mlp_out", "blocks.{layer}.hook_mlp_out"),
}


def expand_sites(site: str | Sequence[str]) -> tuple[str, ...]:
    """``"kv"`` -> ``("k", "v")``; a single site -> itself; validates every name."""
    sites = (site,) if isinstance(site, str) else tuple(site)
    out: list[str] = []
    for s in sites:
        for part in COMPOSITE_SITES.get(s, (s,)):
            if part not in SITE_NAMES:
                raise ValueError(
                    f"unknown site {s!r}; choose one of {', '.join((*COMPOSITE_SITES, *SITE_NAMES))}"
                )
            out.append(part)
    return tuple(dict.fromkeys(out))


def resolve_site(model: Any, site: str) -> HookSite:
    """The :class:`HookSite` of ``site`` on this model (keys after a key norm if any)."""
    (site,) = expand_sites(site)
    if site == "k" and "blocks.0.attn.hook_k_normed" in model.hook_dict:
        return _TEMPLATES["k_normed"]
    hook_site = _TEMPLATES[site]
    if hook_site.name(0) not in model.hook_dict:
        raise ValueError(f"this model has no hook {hook_site.name(0)!r} for site {site!r}")
    return hook_site


def resolve_layers(model: Any, layers: int | Iterable[int] | range | None) -> tuple[int, ...]:
    """``None`` -> every layer; an int or iterable -> validated, sorted, unique layers."""
    n_layers = model.cfg.n_layers
    if layers is None:
        return tuple(range(n_layers))
    chosen = (layers,) if isinstance(layers, int) else tuple(layers)
    if not chosen:
        raise UserError("layers is empty; pass None for every layer, an int, or a list")
    bad = [layer for layer in chosen if not 0 <= layer < n_layers]
    if bad:
        raise UserError(f"layer(s) {bad} out of range: this model has layers 0..{n_layers - 1}")
    return tuple(sorted(set(chosen)))


PATTERN_SITE = HookSite("pattern", "blocks.{layer}.attn.hook_pattern", pos_dim=2, head_dim=1)
"""Attention probabilities ``[batch, head, query_pos, key_pos]`` (after mask and softmax).

Read-only: not one of :data:`SITE_NAMES`, so sweeps and patches never write it.
"""


def pattern_site(model: Any) -> HookSite:
    """:data:`PATTERN_SITE`, checked to exist on ``model``."""
    if PATTERN_SITE.name(0) not in model.hook_dict:
        raise ValueError(
            f"this model has no hook {PATTERN_SITE.name(0)!r} for attention patterns; load it "
            "with attn_implementation='eager' (load_model does) as a TransformerBridge"
        )
    return PATTERN_SITE


ATTENTION_HOOKS = {
    "rot_q": "blocks.{layer}.attn.hook_rot_q",
    "rot_k": "blocks.{layer}.attn.hook_rot_k",
    "scores": "blocks.{layer}.attn.hook_attn_scores",
    "pattern": PATTERN_SITE.template,
    "z": _TEMPLATES["z"].template,
}
"""Read-only attention internals: queries and keys after RoPE, pre-softmax scores,
probabilities and the heads' outputs."""


def attention_hook(part: str, layer: int) -> str:
    """The hook name of an attention internal (a key of :data:`ATTENTION_HOOKS`) at ``layer``."""
    return ATTENTION_HOOKS[part].format(layer=layer)


def n_heads_at(model: Any, site: HookSite) -> int:
    """Number of heads on the site's head axis (KV heads for k/v, query heads for z)."""
    if site.site in KV_SITES:
        return model.cfg.n_key_value_heads or model.cfg.n_heads
    return model.cfg.n_heads
