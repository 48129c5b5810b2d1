"""Attribution patching (AtP): every cell of a sweep from one forward and one backward.

The effect of patching the source's activation ``a_src`` into the target at one
(layer, position, site) cell is estimated to first order around the target's own
activation ``a``::

    metric(patched) ~ metric(target) + grad_a metric(target) . (a_src - a)

(Nanda's attribution patching; Kramar et al. 2024, "AtP*"). One forward of the
target per metric continuation, with a zero-valued leaf added at every swept hook,
and one backward give the gradient at every cell at once; the source's activations
come from one forward of the source on the same prompts.

Key/value cells follow :func:`~piggyback_interp.analysis.reference.reference_sweep`'s
``isolate=True`` meaning: only LATER positions read the patched key/value (the
position's own later keys/values are pinned). The gradient therefore leaves out the
path through the position's own attention row (query ``i`` reading key/value ``i``),
subtracted here exactly from the attention scores' and the head outputs' gradients.

It is an estimate: it fails where the metric is far from linear in the activation,
e.g. a saturated log-probability (use :class:`~piggyback_interp.measures.metrics.LogOdds` or
:class:`~piggyback_interp.measures.metrics.NextTokenKL`), or an attention pattern that a patch
flips from one key to another. :func:`atp_prescreen` ranks every cell by AtP and
patches the top ``k`` exactly.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.core.spans import batch_spans
    >>> from piggyback_interp.measures.metrics import TargetLogProb
    >>> base, ft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    >>> batch = batch_spans(ft.tokenizer, ["Tell me a joke.", "Hi"])
    >>> result = atp_sweep(ft, base, batch, TargetLogProb("I have no idea"))
    >>> result.values.shape == (2, ft.cfg.n_layers, len(batch.spans[0].prefix))
    True
    >>> result.meta["method"]
    'atp'
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange, reduce
from torch import Tensor

from piggyback_interp.analysis.reference import exact_cells
from piggyback_interp.analysis.resid_engine import SWEEP_SITES, resid_cells
from piggyback_interp.analysis.sweep_result import SweepResult, cell_labels, sweep_meta
from piggyback_interp.core.errors import UserError
from piggyback_interp.core.hooks import (
    KV_SITES,
    HookSite,
    attention_hook,
    expand_sites,
    resolve_layers,
    resolve_site,
)
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import ChatBatch, ChatSpans
from piggyback_interp.interventions.activations import (
    Activations,
    SegmentOrPositions,
    as_batch,
    gather,
    segment_positions,
)
from piggyback_interp.interventions.patch import check_tokens
from piggyback_interp.interventions.sources import as_source
from piggyback_interp.measures.metrics import LogitMetric, continuation_inputs


def atp_sweep(
    model: Any,
    source: Any,
    spans: ChatSpans | ChatBatch,
    metric: LogitMetric,
    *,
    site: str | Sequence[str] = "resid_pre",
    layers: int | Iterable[int] | None = None,
    segment: SegmentOrPositions = "prefix",
    isolate: bool = True,
) -> SweepResult:
    """Estimate a layer x position patching sweep by attribution patching.

    Same arguments and result layout as :func:`~piggyback_interp.analysis.sweep.sweep`
    (``values[prompt, layer, cell]`` are estimated patched metric values); ``meta``
    has ``method="atp"``. ``site`` is ``resid_pre`` | ``resid_mid`` | ``resid_post`` |
    ``attn_out`` | ``mlp_out`` | ``k`` | ``v`` | ``kv`` | ``z`` (several sites: the
    estimate of patching all of them at the cell). ``isolate`` (key/value sites): as
    in :func:`~piggyback_interp.analysis.reference.reference_sweep`.
    """
    job = _Job.build(model, source, spans, metric, site, layers, segment)
    delta, clean = job.estimate(isolate)
    return job.result(delta + clean[:, None, None], clean, method="atp", isolate=isolate)


def atp_prescreen(
    model: Any,
    source: Any,
    spans: ChatSpans | ChatBatch,
    metric: LogitMetric,
    *,
    site: str | Sequence[str] = "resid_pre",
    layers: int | Iterable[int] | None = None,
    segment: SegmentOrPositions = "prefix",
    top_k: int = 16,
    isolate: bool = True,
) -> SweepResult:
    """Rank every (layer, cell) by AtP and patch exactly only the ``top_k`` strongest.

    The ranking is by ``|mean over prompts of the estimated effect|``. The result holds
    exact values at the top ``k`` cells (a residual site: on the residual engine,
    :func:`~piggyback_interp.analysis.resid_engine.resid_cells`; other sites: one
    patched forward per cell, as
    :func:`~piggyback_interp.analysis.reference.reference_sweep`) and
    the AtP estimates elsewhere; ``meta["exact_cells"]`` lists the exact ones as
    ``[layer, position]`` and ``meta["atp_values"]`` keeps every estimate (prompt-mean
    per layer x cell). Sites other than a residual one need a left-padded batch
    (``batch_spans(..., align="left")``).
    """
    if top_k < 0:
        raise UserError(f"top_k must be >= 0, got {top_k}")
    on_engine = isinstance(site, str) and site in SWEEP_SITES
    if not on_engine and as_batch(model, spans).align != "left":
        raise UserError(
            f"atp_prescreen patches the top {site!r} cells with the reference loop, which "
            "needs batch_spans(..., align='left')"
        )
    job = _Job.build(model, source, spans, metric, site, layers, segment)
    delta, clean = job.estimate(isolate)
    values = delta + clean[:, None, None]
    atp_mean = values.mean(0).tolist()
    n_cells = delta.shape[2]
    order = delta.mean(0).abs().flatten().argsort(descending=True)[:top_k].tolist()
    exact = sorted((i // n_cells, i % n_cells) for i in order)
    cells = [(job.layers[li], c) for li, c in exact]
    if on_engine:  # the residual engine: a cell's forward starts at its layer, 8 per batch
        patched = resid_cells(model, job.batch, metric, job.acts, cells, site=site, segment=segment)
    else:
        patched = exact_cells(model, job.batch, segment, metric, job.acts, cells, isolate=isolate)
    for n, (li, c) in enumerate(exact):
        values[:, li, c] = patched[:, n]
    result = job.result(values, clean, method="atp_prescreen", isolate=isolate)
    labels = cell_labels(job.batch, job.positions, job.tok)["positions"]
    result.meta.update(
        top_k=top_k,
        exact_cells=[[job.layers[li], labels[c]] for li, c in exact],
        atp_values=atp_mean,
    )
    return result


@dataclass
class _Job:
    """The inputs of an AtP sweep, checked, with the source's activations captured."""

    model: Any
    source: Any
    batch: ChatBatch
    metric: LogitMetric
    sites: tuple[str, ...]
    layers: tuple[int, ...]
    positions: Tensor
    acts: Activations
    tok: Any

    @classmethod
    def build(cls, model, source, spans, metric, site, layers, segment) -> _Job:
        sites = expand_sites(site)
        batch = as_batch(model, spans)
        chosen = resolve_layers(model, layers)
        positions = segment_positions(batch, segment)
        acts = as_source(source).activations(model, batch, segment, site=sites, layers=chosen)
        check_tokens(acts, batch, positions)
        return cls(
            model=model,
            source=source,
            batch=batch,
            metric=metric,
            sites=sites,
            layers=chosen,
            positions=positions,
            acts=acts,
            tok=chat_tokenizer(model),
        )

    def estimate(self, isolate: bool) -> tuple[Tensor, Tensor]:
        """(estimated effect ``[prompts, layers, cells]``, clean metric ``[prompts]``)."""
        grads, clean_acts, clean = _gradients(
            self.model, self.batch, self.metric, self.sites, self.layers, isolate
        )
        B, n = self.positions.shape
        delta = torch.zeros(B, len(self.layers), n)
        for li, layer in enumerate(self.layers):
            for s in self.sites:
                hs = resolve_site(self.model, s)
                name = hs.name(layer)
                g = gather(grads[name], hs, self.positions).float()
                a = gather(clean_acts[name], hs, self.positions).float()
                src = self.acts.values[name].to(a.device).float().expand_as(a)
                delta[:, li] += reduce((src - a) * g, "b n ... -> b n", "sum").cpu()
        return delta, clean

    def result(self, values: Tensor, clean: Tensor, *, method: str, isolate: bool) -> SweepResult:
        src = torch.full_like(clean, float("nan"))
        if (source_model := as_source(self.source).model) is not None:
            with torch.no_grad():
                src = _metric_forward(source_model, self.batch, self.metric, [])
        site = "kv" if self.sites == KV_SITES else ",".join(self.sites)
        meta = {
            **sweep_meta(
                self.model, self.source, self.batch, self.metric, site, self.layers, self.positions
            ),
            "method": method,
            "engine": "attribution patching (first order)",
        }
        if set(self.sites) & set(KV_SITES):
            meta["isolate"] = isolate
        return SweepResult(
            values=values,
            clean=clean,
            source=src.detach().cpu().float(),
            layers=list(self.layers),
            **cell_labels(self.batch, self.positions, self.tok),
            meta=meta,
        )


def _metric_forward(model: Any, batch: ChatBatch, metric: LogitMetric, fwd_hooks: list) -> Tensor:
    """The metric per prompt from one forward per continuation (the continuation
    appended to every row, as :func:`~piggyback_interp.measures.metrics.metric_on_model`), under
    ``fwd_hooks``, with gradients wherever the caller enables them."""
    tok = chat_tokenizer(model)
    logits = []
    for cont, n_read in zip(metric.continuations(tok), metric.n_read(tok), strict=True):
        ids, mask, pos = continuation_inputs(batch, cont, model.cfg.device)
        with model.hooks(fwd_hooks=fwd_hooks):
            out = model(ids, attention_mask=mask, position_ids=pos)
        start = ids.shape[1] - len(cont) - 1
        logits.append(out[:, start : start + n_read])
    return metric(logits)


def _gradients(
    model: Any,
    batch: ChatBatch,
    metric: LogitMetric,
    sites: Sequence[str],
    layers: Sequence[int],
    isolate: bool,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """d metric / d activation at every hooked (site, layer), summed over prompts (rows
    are independent, so row ``b`` holds prompt ``b``'s gradient), over the prompt
    columns only; the clean activations there; and the clean metric."""
    width = batch.input_ids.shape[1]
    hook_sites = {s: resolve_site(model, s) for s in sites}
    kv = isolate and any(s in KV_SITES for s in sites)
    leaves: dict[str, list[Tensor]] = {}
    clean_acts: dict[str, Tensor] = {}
    attn: dict[tuple[str, int], list[Tensor]] = {}  # (what, layer) -> per continuation

    def leaf(hs: HookSite, name: str):
        def hook(act: Tensor, hook: Any) -> Tensor:
            zero = torch.zeros_like(act, requires_grad=True)
            leaves.setdefault(name, []).append(zero)
            clean_acts.setdefault(name, act.detach().narrow(hs.pos_dim, 0, width))
            return act + zero

        return hook

    def keep(what: str, layer: int, detach: bool):
        def hook(act: Tensor, hook: Any) -> Tensor:
            attn.setdefault((what, layer), []).append(act.detach() if detach else act)
            return act

        return hook

    by_name = {hs.name(layer): hs for hs in hook_sites.values() for layer in layers}
    fwd_hooks = [(name, leaf(hs, name)) for name, hs in by_name.items()]
    if kv:
        for layer in layers:
            fwd_hooks += [
                (attention_hook(part, layer), keep(part, layer, detach))
                for part, detach in (
                    ("rot_q", True),
                    ("rot_k", False),
                    ("scores", False),
                    ("pattern", True),
                    ("z", False),
                )
            ]
    with torch.enable_grad():
        values = _metric_forward(model, batch, metric, fwd_hooks)
        names = list(leaves)
        inputs = [t for name in names for t in leaves[name]]
        counts = [len(leaves[name]) for name in names]
        extra: list[Tensor] = []
        if kv:
            extra = [t for layer in layers for w in ("scores", "z") for t in attn[(w, layer)]]
        out = torch.autograd.grad(values.sum(), inputs + extra, retain_graph=kv, allow_unused=True)
        out = [
            torch.zeros_like(t) if g is None else g
            for t, g in zip(inputs + extra, out, strict=True)
        ]
        grads: dict[str, list[Tensor]] = {}
        i = 0
        for name, count in zip(names, counts, strict=True):
            grads[name] = out[i : i + count]
            i += count
        if kv:
            extra_grads = dict(zip(map(id, extra), out[len(inputs) :], strict=True))
            for layer in layers:
                _remove_self_reads(model, layer, hook_sites, leaves, grads, attn, extra_grads)
    summed = {
        name: sum(g.narrow(by_name[name].pos_dim, 0, width) for g in per_cont)
        for name, per_cont in grads.items()
    }
    return summed, clean_acts, values.detach().cpu().float()


def _remove_self_reads(model, layer, hook_sites, leaves, grads, attn, extra_grads) -> None:
    """Subtract from the key/value gradients at ``layer`` the part that flows through
    each position's own attention row (query ``i`` reading key/value ``i``).

    Key: ``d score[h, i, i] / d rot_k[i, g] = scaling * rot_q[i, h]`` for the query heads
    ``h`` of KV head ``g``, taken back to the hooked key by the model's own rotation (a
    vector-Jacobian product). Value: ``d z[i, h] / d v[i, g] = pattern[h, i, i]``."""
    attn_module = model.blocks[layer].attn.original_component
    scaling = attn_module.scaling
    if getattr(attn_module, "attn_logit_softcapping", None) is not None:
        raise UserError(
            "isolated key/value attribution patching does not support attention logit "
            "softcapping; pass isolate=False"
        )
    for c in range(len(attn[("scores", layer)])):
        if "k" in hook_sites:
            name = hook_sites["k"].name(layer)
            g_scores = extra_grads[id(attn[("scores", layer)][c])]
            diag = rearrange(g_scores.diagonal(dim1=-2, dim2=-1), "b h t -> b t h")
            rot_q = attn[("rot_q", layer)][c]  # [B, T, H, d]
            per_q = diag[..., None] * scaling * rot_q
            rot_k = attn[("rot_k", layer)][c]  # [B, T, G, d]
            # the query heads of each KV head, summed
            self_rot = reduce(per_q, "b t (g h) d -> b t g d", "sum", g=rot_k.shape[2])
            (self_k,) = torch.autograd.grad(
                rot_k, leaves[name][c], grad_outputs=self_rot, retain_graph=True
            )
            grads[name][c] = grads[name][c] - self_k
        if "v" in hook_sites:
            name = hook_sites["v"].name(layer)
            g_z = extra_grads[id(attn[("z", layer)][c])]  # [B, T, H, d]
            p_diag = rearrange(
                attn[("pattern", layer)][c].diagonal(dim1=-2, dim2=-1), "b h t -> b t h"
            )
            per_q = p_diag[..., None] * g_z
            n_kv = grads[name][c].shape[2]
            grads[name][c] = grads[name][c] - reduce(per_q, "b t (g h) d -> b t g d", "sum", g=n_kv)


__all__ = ["atp_prescreen", "atp_sweep"]
