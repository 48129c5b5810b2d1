"""TReFT's regulariser (arXiv 2606.06667, Eqs. 2-3): keep template keys/values near the initial model's.

For a token region T (default: the prefix) and every layer l:

    L_K(l) = mean_{t in T} ||k_t - k_t^init||^2 / ||k_t^init||^2     (same for V)
    L_KV   = mean_l (L_K(l) + L_V(l));       loss = L_SFT + lambda * L_KV

``k`` and ``v`` are what attention uses, read through the same hook sites as
:func:`~piggyback_interp.interventions.patch_prefix` (after the key norm on Qwen3; before
RoPE, a per-position rotation that leaves the relative L2 unchanged). Because
attention is causal, the initial model's prefix keys/values do not depend on the
query: :func:`kv_reference` computes them ONCE per distinct prefix, before training,
from the model itself — no frozen second model, no second forward per step.

``variant="pseudo"`` is the authors' released code: ``k_proj``/``v_proj`` applied to
the residual stream WITHOUT the input norm (offered only as a named option).

Example:
    >>> import torch
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.core.spans import chat_spans
    >>> model = tiny_model("llama")
    >>> spans = chat_spans(model.tokenizer, "Hi")
    >>> ref = kv_reference(model, [spans.input_ids[: len(spans.prefix)]])
    >>> reg = KVRegulariser(model, ref)
    >>> with reg.recording():
    ...     _ = model(spans.ids[None])
    >>> reg.loss([spans.input_ids[: len(spans.prefix)]]).item()   # the initial model: zero
    0.0
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from piggyback_interp.core.checks import Choice
from piggyback_interp.core.hf import self_attention
from piggyback_interp.core.hooks import KV_SITES, HookSite, resolve_layers, resolve_site


class Variant(Choice):
    """Which keys/values: ``true`` (what attention uses) or ``pseudo`` (the released code's
    ``k_proj``/``v_proj`` of the un-normed residual stream)."""

    TRUE = "true"
    PSEUDO = "pseudo"


class Region(Choice):
    """The tokens TReFT regularises (see :func:`region_target`)."""

    PREFIX = "prefix"
    POSTFIX = "postfix"
    TEMPLATE = "template"  # prefix and postfix
    QUERY = "query"
    ALL = "all"


Prefix = tuple[int, ...]


def _position_first(act: Tensor, site: HookSite) -> Tensor:
    """[batch, pos, ...] view of a site's activation, whatever its layout."""
    return act.movedim(site.pos_dim, 1)


def _pseudo_kv(model: Any, layer: int, resid: Tensor) -> dict[str, Tensor]:
    """The released code's pseudo-K/V: projections of the UN-normed residual stream."""
    attn = self_attention(model, layer)
    b, p, _ = resid.shape
    return {
        "k": attn.k_proj(resid).view(b, p, -1),
        "v": attn.v_proj(resid).view(b, p, -1),
    }


@dataclass
class KVReference:
    """Initial-model keys/values over token sequences, each run once:
    ``values[sequence][(site, layer)]`` is ``[len(sequence), features]`` (heads x d_head
    flattened). The sequences are prefixes (the default region), empty-query prompts
    (postfix region) or whole examples (query / all / explicit regions)."""

    values: dict[Prefix, dict[tuple[str, int], Tensor]]
    layers: tuple[int, ...]
    variant: Variant | str = Variant.TRUE
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, prefix: Sequence[int]) -> dict[tuple[str, int], Tensor]:
        key = tuple(prefix)
        if key not in self.values:
            raise KeyError(
                f"no reference for this prefix or sequence ({len(key)} tokens); compute one with "
                "kv_reference(model, sequences) for every system prompt / example used in training"
            )
        return self.values[key]

    def to(self, device: str | torch.device) -> KVReference:
        """The same reference with every tensor on ``device``."""
        values = {p: {k: v.to(device) for k, v in d.items()} for p, d in self.values.items()}
        return dataclasses.replace(self, values=values)


class _Recorder:
    """Hooks that keep (with gradients) the K/V of every forward inside ``recording()``."""

    def __init__(self, model: Any, layers: Sequence[int], variant: Variant | str):
        self.model, self.layers = model, tuple(layers)
        self.variant = Variant.parse(variant, "variant")
        self.seen: dict[tuple[str, int], Tensor] = {}

    def hooks(self) -> list[tuple[str, Any]]:
        out = []
        for layer in self.layers:
            if self.variant is Variant.PSEUDO:
                name = resolve_site(self.model, "resid_pre").name(layer)
                out.append((name, self._keep_pseudo(layer)))
                continue
            for site_name in KV_SITES:
                site = resolve_site(self.model, site_name)
                out.append((site.name(layer), self._keep(site, site_name, layer)))
        return out

    def _keep(self, site: HookSite, site_name: str, layer: int):
        def hook(act: Tensor, hook: Any) -> Tensor:
            kv = _position_first(act, site)
            self.seen[(site_name, layer)] = rearrange(kv, "b p head d -> b p (head d)")
            return act

        return hook

    def _keep_pseudo(self, layer: int):
        def hook(act: Tensor, hook: Any) -> Tensor:
            for site_name, value in _pseudo_kv(self.model, layer, act).items():
                self.seen[(site_name, layer)] = value
            return act

        return hook


def kv_reference(
    model: Any,
    prefixes: Iterable[Sequence[int]],
    *,
    layers: int | Iterable[int] | None = None,
    variant: Variant | str = Variant.TRUE,
) -> KVReference:
    """The model's keys/values over each distinct prefix (or any token sequence),
    computed once, without gradients. Call it on the INITIAL model, before any update.
    """
    chosen = resolve_layers(model, layers)
    recorder = _Recorder(model, chosen, variant)
    values: dict[Prefix, dict[tuple[str, int], Tensor]] = {}
    with torch.no_grad(), model.hooks(fwd_hooks=recorder.hooks()):
        for prefix in dict.fromkeys(tuple(p) for p in prefixes):
            if not prefix:
                raise ValueError(
                    "an empty prefix: this chat template has no tokens before the user's text; "
                    "regularise the postfix instead"
                )
            recorder.seen.clear()
            model(torch.tensor([prefix], device=model.cfg.device))
            values[prefix] = {k: v[0].detach().clone() for k, v in recorder.seen.items()}
    return KVReference(values, chosen, recorder.variant, {"n_prefixes": len(values)})


@dataclass(frozen=True)
class RowTarget:
    """Where one training row is regularised: its ``positions``, compared with the
    reference of ``sequence`` at ``ref_positions`` (same length)."""

    sequence: tuple[int, ...]
    ref_positions: tuple[int, ...]
    positions: tuple[int, ...]

    @classmethod
    def prefix(cls, prefix: Sequence[int]) -> RowTarget:
        n = len(prefix)
        return cls(tuple(prefix), tuple(range(n)), tuple(range(n)))


REGIONS = Region.values()


def region_target(
    input_ids: Sequence[int],
    spans: Any,
    region: Region | str | Sequence[int],
    *,
    postfix_reference: tuple[Sequence[int], Any] | None = None,
) -> RowTarget:
    """The :class:`RowTarget` of a training example for a TReFT token region.

    * ``"prefix"`` (default): the template before the user's text; reference: the prefix alone.
    * ``"postfix"``: the template after it; reference: the EMPTY-query prompt (the example's
      prefix + postfix tokens), so no query information enters the reference — or, with
      ``postfix_reference=(input_ids, spans)`` of one example, that example's postfix
      (the paper's Qwen3 variant: one reference for every row).
    * ``"template"``: prefix and postfix together; reference: the empty-query prompt.
    * ``"query"``, ``"all"`` (every position) or explicit positions: reference: the
      example itself, run once before training.
    """
    ids = tuple(input_ids)
    if not isinstance(region, str):
        positions = tuple(region)
        bad = [p for p in positions if not 0 <= p < len(ids)]
        if bad:
            raise ValueError(
                f"region position(s) {bad} are outside the example ({len(ids)} tokens)"
            )
        return RowTarget(ids, positions, positions)
    target = _REGION_TARGETS[Region.parse(region, "region")]
    return target(ids, ids[: len(spans.prefix)], spans, postfix_reference)


def _prefix_target(ids: Prefix, prefix: Prefix, spans: Any, reference: Any) -> RowTarget:
    if not prefix:
        raise ValueError(
            "this chat template has no prefix before the user's text; use region='postfix'"
        )
    return RowTarget.prefix(prefix)


def _postfix_target(ids: Prefix, prefix: Prefix, spans: Any, reference: Any) -> RowTarget:
    post = tuple(spans.postfix)
    if not post:
        raise ValueError(
            "this chat template has no postfix after the user's text; use region='prefix'"
        )
    if reference is not None:
        ref_ids, ref_spans = reference
        ref_post = tuple(ref_spans.postfix)
        if [ref_ids[p] for p in ref_post] != [ids[p] for p in post]:
            raise ValueError("the reference example's postfix tokens differ from this example's")
        return RowTarget(tuple(ref_ids), ref_post, post)
    empty = prefix + tuple(ids[p] for p in post)
    return RowTarget(empty, tuple(range(len(prefix), len(empty))), post)


def _template_target(ids: Prefix, prefix: Prefix, spans: Any, reference: Any) -> RowTarget:
    post = tuple(spans.postfix)
    if not prefix and not post:
        raise ValueError("this chat template has neither a prefix nor a postfix")
    # causal attention: the prefix's K/V in the empty-query prompt are those of the prefix
    # alone, so one reference serves both segments without any query information
    empty = prefix + tuple(ids[p] for p in post)
    return RowTarget(empty, tuple(range(len(empty))), tuple(range(len(prefix))) + post)


def _query_target(ids: Prefix, prefix: Prefix, spans: Any, reference: Any) -> RowTarget:
    return RowTarget(ids, tuple(spans.query), tuple(spans.query))


def _all_target(ids: Prefix, prefix: Prefix, spans: Any, reference: Any) -> RowTarget:
    every = tuple(range(len(ids)))
    return RowTarget(ids, every, every)


_REGION_TARGETS = {
    Region.PREFIX: _prefix_target,
    Region.POSTFIX: _postfix_target,
    Region.TEMPLATE: _template_target,
    Region.QUERY: _query_target,
    Region.ALL: _all_target,
}


def relative_sq_error(
    current: Float[Tensor, "n features"], reference: Float[Tensor, "n features"]
) -> Float[Tensor, ""]:
    """mean_t ||current_t - reference_t||^2 / ||reference_t||^2 (float32)."""
    current, reference = current.float(), reference.float()
    num = (current - reference).pow(2).sum(-1)
    den = reference.pow(2).sum(-1).clamp_min(1e-12)
    return (num / den).mean()


class KVRegulariser:
    """Records the model's K/V during a forward and returns TReFT's ``L_KV`` for it.

    Rows' prefixes must start at position 0 (right-padded batches) and be keys of
    the :class:`KVReference`.
    """

    def __init__(self, model: Any, reference: KVReference):
        self.reference = reference
        self._recorder = _Recorder(model, reference.layers, reference.variant)
        self.model = model

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        self._recorder.seen.clear()
        with self.model.hooks(fwd_hooks=self._recorder.hooks()):
            yield

    def per_layer(
        self, targets: Sequence[RowTarget | Sequence[int]]
    ) -> dict[int, Float[Tensor, ""]]:
        """L_K(l) + L_V(l) for every layer, averaged over the rows.

        ``targets[row]`` is a :class:`RowTarget`, or a prefix (token ids) for the default
        region."""
        seen = self._recorder.seen
        if not seen:
            raise RuntimeError(
                "no forward was recorded: run the model inside `with reg.recording():`"
            )
        rows = [t if isinstance(t, RowTarget) else RowTarget.prefix(t) for t in targets]
        out: dict[int, Tensor] = {}
        for layer in self.reference.layers:
            terms = []
            for row, target in enumerate(rows):
                ref = self.reference[target.sequence]
                pos, ref_pos = list(target.positions), list(target.ref_positions)
                terms.append(
                    sum(
                        relative_sq_error(
                            seen[(s, layer)][row, pos],
                            ref[(s, layer)][ref_pos].to(seen[(s, layer)].device),
                        )
                        for s in KV_SITES
                    )
                )
            out[layer] = torch.stack(terms).mean()
        return out

    def loss(self, targets: Sequence[RowTarget | Sequence[int]]) -> Float[Tensor, ""]:
        """L_KV = mean over layers of (L_K(l) + L_V(l))."""
        return torch.stack(list(self.per_layer(targets).values())).mean()


__all__ = [
    "REGIONS",
    "KVReference",
    "KVRegulariser",
    "Region",
    "RowTarget",
    "Variant",
    "kv_reference",
    "region_target",
    "relative_sq_error",
]
