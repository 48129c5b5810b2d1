"""Patching figures: the layer x position heatmap of a sweep, recovery-per-layer curves."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor

from piggyback_interp.analysis.sweep_result import SweepResult
from piggyback_interp.report.figures.style import (
    SEGMENT_ORDER,
    TEMPLATE,
    Z95,
    colour_map,
    display_token,
    html_escape,
    mean_se,
    ordered,
    require_columns,
    with_alpha,
)


def cell_labels(result: SweepResult) -> list[str]:
    """``"<position> <token>"`` per cell, e.g. ``"12 ␣helpful"`` (unique: positions are)."""
    if result.positions == [-1]:  # kv_layer_sweep: one cell, the whole prefix
        return ["whole prefix"]
    return [f"{p} {display_token(t)}" for p, t in zip(result.positions, result.tokens, strict=True)]


def _runs(labels: list[str]) -> list[tuple[str, int, int]]:
    """Consecutive runs of equal labels: (label, first index, last index)."""
    runs: list[tuple[str, int, int]] = []
    for i, label in enumerate(labels):
        if runs and runs[-1][0] == label and runs[-1][2] == i - 1:
            runs[-1] = (label, runs[-1][1], i)
        else:
            runs.append((label, i, i))
    return runs


def patching_heatmap(
    result: SweepResult,
    *,
    value: str = "recovery",
    prompt: int | None = None,
    title: str | None = None,
) -> go.Figure:
    """Layer x position heatmap of a :func:`~piggyback_interp.analysis.sweep.sweep` result.

    x: the swept positions, labelled ``"<position> <token>"`` (``␣`` = space, ``↵`` =
    newline); y: layers; a coloured strip above the map names each segment (prefix /
    query / postfix) and dashed lines separate them. ``value="recovery"``: (patched -
    clean) / (source - clean), diverging around 0 = no effect (1 = the source's, i.e. the
    base model's, behaviour); ``value="value"``: the raw metric, diverging around the mean
    clean (unpatched) value. ``prompt=None`` averages over prompts (NaN recoveries, where
    source == clean, are left out); an int shows that prompt.

    Example:
        >>> from piggyback_interp.testing import tiny_model
        >>> from piggyback_interp.core.spans import batch_spans
        >>> from piggyback_interp.measures.metrics import TargetLogProb
        >>> from piggyback_interp.analysis.sweep import sweep
        >>> base, ft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
        >>> batch = batch_spans(ft.tokenizer, ["Tell me a joke.", "Hi"])
        >>> result = sweep(ft, base, batch, TargetLogProb("I have no idea"), progress=False)
        >>> fig = patching_heatmap(result)
        >>> fig.data[0].zmid, len(fig.data[0].y) == ft.cfg.n_layers
        (0.0, True)
    """
    if value not in ("recovery", "value"):
        raise ValueError(f"value must be 'recovery' or 'value', got {value!r}")
    z, zmid = _heatmap_values(result, value, prompt)
    n_layers, n_cells = z.shape
    metric = str(result.meta.get("metric", "metric"))
    labels = cell_labels(result)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(n_cells)),
            y=[str(layer) for layer in result.layers],
            zmid=zmid,
            colorscale="RdBu",
            colorbar={"title": {"text": "recovery" if value == "recovery" else metric}},
            customdata=np.array([labels] * n_layers, dtype=object),  # [layers, cells]
            hovertemplate=f"layer %{{y}}<br>%{{customdata}}<br>{value} %{{z:.3f}}<extra></extra>",
            name=value,
        )
    )
    _add_segments(fig, list(result.segments))
    who = "mean over prompts" if prompt is None else f"prompt {prompt}"
    site = result.meta.get("site")
    default_title = (
        f"Patching {site + ' ' if site else ''}per layer and position: {value} of {metric} ({who})"
    )
    fig.update_layout(
        template=TEMPLATE,
        title={"text": html_escape(title or default_title)},
        height=max(440, 24 * n_layers + 300),
        margin={"t": 110, "b": 120},
    )
    fig.update_xaxes(
        title_text="position and token",
        tickmode="array",
        tickvals=list(range(n_cells)),
        ticktext=[html_escape(label) for label in labels],
        tickangle=-60 if n_cells > 6 else 0,
        range=[-0.5, n_cells - 0.5],
        showgrid=False,
    )
    fig.update_yaxes(title_text="layer", type="category", showgrid=False)
    return fig


def _heatmap_values(
    result: SweepResult, value: str, prompt: int | None
) -> tuple[np.ndarray, float]:
    """(z [layers, cells], zmid): the recovery or raw value, averaged over prompts (NaN
    left out) or of one prompt; zmid is 0 for recovery, else the mean clean value."""
    n_prompts, n_layers, n_cells = result.values.shape
    if n_layers != len(result.layers) or n_cells != len(result.positions):
        raise ValueError(
            f"values have shape {tuple(result.values.shape)} but the result names "
            f"{len(result.layers)} layers and {len(result.positions)} positions"
        )
    if prompt is not None and not 0 <= prompt < n_prompts:
        raise ValueError(
            f"prompt must be in 0..{n_prompts - 1} (or None for the mean), got {prompt}"
        )
    rows = slice(None) if prompt is None else slice(prompt, prompt + 1)
    data = (result.recovery() if value == "recovery" else result.values)[rows]
    z = torch.nanmean(data.double(), dim=0).numpy()
    zmid = 0.0 if value == "recovery" else float(result.clean[rows].double().mean())
    return z, zmid


def _add_segments(fig: go.Figure, segments: list[str]) -> None:
    """A coloured, labelled strip above the map per run of one segment, dashed lines
    between runs."""
    runs = _runs(segments)
    colours = colour_map(ordered(segments, SEGMENT_ORDER))
    for label, first, last in runs:
        fig.add_shape(
            type="rect",
            xref="x",
            yref="y domain",
            x0=first - 0.5,
            x1=last + 0.5,
            y0=1.01,
            y1=1.09,
            fillcolor=colours[label],
            line_width=0,
            name=f"segment:{label}",
        )
        fig.add_annotation(
            x=(first + last) / 2,
            xref="x",
            y=1.05,
            yref="y domain",
            yanchor="middle",
            text=html_escape(label),
            showarrow=False,
            font={"color": "white", "size": 11},
            name=f"segment:{label}",
        )
    for _, first, _ in runs[1:]:
        fig.add_shape(
            type="line",
            xref="x",
            yref="y domain",
            x0=first - 0.5,
            x1=first - 0.5,
            y0=0,
            y1=1.0,
            line={"color": "black", "width": 1, "dash": "dash"},
            name="segment boundary",
        )


# ---------------------------------------------------------------- recovery curves

CurveInput = SweepResult | Tensor | np.ndarray


def _per_unit(curve: CurveInput, label: str) -> tuple[list[int], np.ndarray]:
    """(layers, recovery [units, layers]) of one curve."""
    if isinstance(curve, SweepResult):
        rec = torch.nanmean(curve.recovery().double(), dim=2)  # mean over the swept cells
        return list(curve.layers), rec.numpy()
    array = (
        curve.detach().double().cpu().numpy() if isinstance(curve, Tensor) else np.asarray(curve)
    )
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(
            f"curve {label!r}: pass recovery as a [prompts, layers] array, got shape {array.shape}"
        )
    return list(range(array.shape[1])), array.astype(np.float64)


def _from_frame(
    frame: pd.DataFrame, condition: str | None, value: str
) -> tuple[dict[str, tuple[list[int], np.ndarray]], str]:
    if condition is None:
        condition = next((c for c in ("condition", "positions_from") if c in frame.columns), None)
        if condition is None:
            raise ValueError(
                "the frame needs a 'condition' column (or 'positions_from', as compare_controls "
                f"gives; or pass condition=...); got {list(frame.columns)}"
            )
    require_columns(frame, [condition, "layer", value], "layer_recovery_curve")
    units = [c for c in ("prompt", "seed") if c in frame.columns]
    if units and frame.duplicated([condition, "layer", *units]).any():
        raise ValueError(
            f"several rows share (condition, layer, {', '.join(units)}); "
            "each row must be one replicate: tag rows with their prompt/seed"
        )
    curves = {}
    for label in ordered(frame[condition], SEGMENT_ORDER):
        group = frame[frame[condition] == label]
        layers = sorted(group["layer"].unique().tolist())
        columns = [group.loc[group["layer"] == layer, value].to_numpy(float) for layer in layers]
        width = max(len(c) for c in columns)
        matrix = np.full((width, len(layers)), np.nan)
        for j, col in enumerate(columns):
            matrix[: len(col), j] = col
        curves[str(label)] = (layers, matrix)
    unit = "seeds" if units == ["seed"] else "prompts"
    return curves, unit


def layer_recovery_curve(
    curves: Mapping[str, CurveInput] | pd.DataFrame,
    *,
    condition: str | None = None,
    value: str = "recovery",
    title: str | None = None,
) -> go.Figure:
    """Recovery per layer, one line per condition (prefix vs query / random controls),
    with a 95% band: mean ± 1.96 SE over prompts (or seeds).

    ``curves`` is either

    * ``{label: x}`` where ``x`` is a :class:`SweepResult` (its per-prompt
      :meth:`~SweepResult.recovery` averaged over the swept cells: for
      :func:`kv_layer_sweep`, whose one cell is the whole prefix, exactly its recovery;
      for a position sweep, the mean single-position recovery of the segment) or a
      ``[prompts, layers]`` tensor / array of recoveries (layers 0, 1, ...);
    * or a tidy DataFrame, one row per replicate: ``condition`` (or ``positions_from``,
      as :func:`compare_controls` names it), ``layer``, ``recovery`` and optionally
      ``prompt`` / ``seed`` (rows with the same condition, layer, prompt and seed are
      refused as duplicates).

    NaN recoveries (source == clean) are left out of the mean and the count; with one
    finite value at a layer there is no band there.

    Example:
        >>> import torch
        >>> fig = layer_recovery_curve({"prefix": torch.tensor([[0.2, 0.8], [0.4, 0.6]])})
        >>> fig.data[-1].y.round(2).tolist()
        [0.3, 0.7]
    """
    if isinstance(curves, pd.DataFrame):
        if curves.empty:
            raise ValueError("the frame has no rows")
        per_unit, unit = _from_frame(curves, condition, value)
    else:
        if not curves:
            raise ValueError("pass at least one curve: {label: SweepResult | [prompts, layers]}")
        per_unit = {str(k): _per_unit(v, str(k)) for k, v in curves.items()}
        unit = "prompts"
    colours = colour_map(per_unit)
    fig = go.Figure()
    for label, (layers, matrix) in per_unit.items():
        _add_curve(fig, label, layers, matrix, colours[label])
    fig.add_hline(y=0, line={"color": "grey", "dash": "dot", "width": 1})
    fig.add_hline(y=1, line={"color": "grey", "dash": "dash", "width": 1})
    fig.update_layout(
        template=TEMPLATE,
        title={"text": title or f"Recovery per layer (mean, band = ± 1.96 SE over {unit})"},
        xaxis_title="layer",
        yaxis_title="recovery (0 = no effect, 1 = base behaviour)",
        height=450,
        legend_title_text="patched positions",
    )
    all_layers = sorted({layer for layers, _ in per_unit.values() for layer in layers})
    if len(all_layers) <= 32:  # a tick at every layer that has a point
        fig.update_xaxes(tickmode="array", tickvals=all_layers)
    return fig


def _add_curve(
    fig: go.Figure, label: str, layers: list[int], matrix: np.ndarray, colour: str
) -> None:
    """One condition: its 95% band (mean ± 1.96 SE, where there is an SE) and its mean line."""
    mean, se, n = mean_se(matrix)
    band = np.isfinite(se)
    if band.any():
        xs = [layer for layer, b in zip(layers, band, strict=True) if b]
        upper, lower = (mean + Z95 * se)[band], (mean - Z95 * se)[band]
        fig.add_trace(
            go.Scatter(
                x=xs + xs[::-1],
                y=np.concatenate([upper, lower[::-1]]),
                mode="lines",
                fill="toself",
                fillcolor=with_alpha(colour, 0.2),
                line={"width": 0},
                hoverinfo="skip",
                showlegend=False,
                legendgroup=label,
                name=f"{label} ± 1.96 SE",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=layers,
            y=mean,
            mode="lines+markers",
            line={"color": colour, "width": 2},
            name=label,
            legendgroup=label,
            customdata=np.stack([se, n], axis=-1),
            hovertemplate=(
                f"{label}<br>layer %{{x}}<br>recovery %{{y:.3f}} ± %{{customdata[0]:.3f}} SE"
                f" (n=%{{customdata[1]}})<extra></extra>"
            ),
        )
    )


__all__ = ["cell_labels", "layer_recovery_curve", "patching_heatmap"]
