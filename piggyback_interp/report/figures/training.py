"""Training figures: loss / regulariser / prefix drift per layer over steps; task-vector cosines."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from piggyback_interp.report.figures.style import (
    PALETTE,
    TEMPLATE,
    html_escape,
    ordered,
    require_columns,
)
from piggyback_interp.training import FinetuneResult

History = Sequence[Mapping[str, Any]]
Run = FinetuneResult | History | Mapping[str, Any] | str | os.PathLike[str]


def _load(run: Run, label: str | None) -> tuple[str, list[dict[str, Any]]]:
    """(label, history) of one run: a FinetuneResult, a history list, a finetune.json
    dict, or the path of finetune.json (or of the folder that holds it)."""
    method = None
    if isinstance(run, FinetuneResult):
        history, method = list(run.history), run.config.method
    elif isinstance(run, (str, os.PathLike)):
        path = Path(run)
        path = path / "finetune.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"no finetune.json at {path}")
        saved = json.loads(path.read_text("utf-8"))
        history, method = saved.get("history"), saved.get("config", {}).get("method")
    elif isinstance(run, Mapping):
        history, method = run.get("history"), run.get("config", {}).get("method")
    else:
        history = list(run)
    if not history:
        raise ValueError(f"run {label or method or ''!r} has no history (no finished step)")
    for entry in history:
        for key in ("step", "sft", "kv", "drift"):
            if key not in entry:
                raise ValueError(
                    f"history entries need 'step', 'sft', 'kv' and 'drift' (finetune's log); "
                    f"an entry has {sorted(entry)}"
                )
    return label or method or "run", [dict(e) for e in history]


def _runs(runs: Run | Mapping[str, Run]) -> dict[str, list[dict[str, Any]]]:
    is_one = (
        isinstance(runs, (FinetuneResult, str, os.PathLike))
        or (isinstance(runs, Mapping) and "history" in runs)
        or (isinstance(runs, Sequence) and not isinstance(runs, Mapping))
    )
    if is_one:
        label, history = _load(runs, None)
        return {label: history}
    if not runs:
        raise ValueError("pass a run or {label: run}")
    return dict(_load(run, str(label)) for label, run in runs.items())


def drift_matrix(history: History) -> tuple[list[int], list[int], np.ndarray]:
    """(steps, layers, drift [layers, steps]) of one history: ``L_K(l) + L_V(l)`` at
    the prefix (the regulariser's region) per layer and step."""
    steps = [int(e["step"]) for e in history]
    layers = sorted({int(k) for e in history for k in e["drift"]})
    z = np.array([[float(e["drift"].get(str(layer), np.nan)) for e in history] for layer in layers])
    return steps, layers, z


def training_curves(
    runs: Run | Mapping[str, Run],
    *,
    drift: str = "heatmap",
    title: str | None = None,
) -> go.Figure:
    """SFT loss, the regulariser ``L_KV`` (and the KL term of the KL baselines) and the
    prefix drift per layer over training steps, for one run or ``{label: run}``.

    A run is a :class:`~piggyback_interp.training.FinetuneResult`, its ``history``, the
    ``finetune.json`` it writes (path, folder, or the loaded dict). ``L_KV`` is logged
    unweighted (for SFT too, where it is not trained on), so runs compare directly.
    ``drift="heatmap"``: one heatmap per run (x = step, y = layer, shared colour
    scale); ``"lines"``: one line per layer (dash per run).

    Example:
        >>> history = [{"step": s, "epoch": 0, "sft": 2.0 / s, "kv": 0.01 * s,
        ...             "drift": {"0": 0.01 * s, "1": 0.02 * s}} for s in (1, 2, 3)]
        >>> fig = training_curves({"treft": history})
        >>> list(fig.data[0].y)
        [2.0, 1.0, 0.6666666666666666]
    """
    if drift not in ("heatmap", "lines"):
        raise ValueError(f"drift must be 'heatmap' or 'lines', got {drift!r}")
    histories = _runs(runs)
    fig = _subplots(list(histories), drift)
    for i, (label, history) in enumerate(histories.items()):
        colour = PALETTE[i % len(PALETTE)]
        _add_loss_traces(fig, label, history, colour)
        if drift == "heatmap":
            _add_drift_heatmap(fig, label, history, row=3 + i)
        else:
            _add_drift_lines(fig, label, history, dash=_DASHES[i % len(_DASHES)])
    _layout(fig, histories, drift, title)
    return fig


_DASHES = ("solid", "dash", "dot", "dashdot", "longdash")  # one per run (drift lines)


def _subplots(labels: list[str], drift: str) -> go.Figure:
    """The empty panels: SFT loss, L_KV, then the drift (a heatmap per run, or one panel)."""
    titles = ["SFT loss (response tokens)", "regulariser L_KV (unweighted; KL dashed)"]
    if drift == "heatmap":
        titles += [f"prefix drift per layer: {label}" for label in labels]
    else:
        titles += ["prefix drift per layer"]
    n_drift = len(titles) - 2
    return make_subplots(
        rows=2 + n_drift,
        cols=1,
        shared_xaxes=True,
        subplot_titles=[html_escape(t) for t in titles],
        vertical_spacing=0.06 if n_drift > 1 else 0.09,
    )


def _add_loss_traces(fig: go.Figure, label: str, history: History, colour: str) -> None:
    """SFT loss (row 1), L_KV and, for the KL baselines, the KL term dashed (row 2)."""
    steps = [int(e["step"]) for e in history]
    fig.add_trace(
        go.Scatter(
            x=steps,
            y=[float(e["sft"]) for e in history],
            name=label,
            legendgroup=label,
            line={"color": colour},
            mode="lines",
        ),
        row=1,
        col=1,
    )
    terms = [("kv", "L_KV", {"color": colour})]
    if any("kl" in e for e in history):
        terms.append(("kl", "KL", {"color": colour, "dash": "dash"}))
    for key, name, line in terms:
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=[float(e.get(key, np.nan)) for e in history],
                name=f"{label} {name}",
                legendgroup=label,
                showlegend=False,
                line=line,
                mode="lines",
            ),
            row=2,
            col=1,
        )


def _add_drift_heatmap(fig: go.Figure, label: str, history: History, row: int) -> None:
    """One run's drift as a heatmap (x = step, y = layer) on the shared colour axis."""
    steps, layers, z = drift_matrix(history)
    fig.add_trace(
        go.Heatmap(
            x=steps,
            y=[str(layer) for layer in layers],
            z=z,
            coloraxis="coloraxis",
            name=f"{label} drift",
            hovertemplate=f"{label}<br>step %{{x}}<br>layer %{{y}}<br>drift %{{z:.4g}}<extra></extra>",
        ),
        row=row,
        col=1,
    )
    fig.update_yaxes(title_text="layer", type="category", row=row, col=1)


def _add_drift_lines(fig: go.Figure, label: str, history: History, dash: str) -> None:
    """One run's drift as one line per layer (coloured by layer, dashed by run), row 3."""
    steps, layers, z = drift_matrix(history)
    for j, layer in enumerate(layers):
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=z[j],
                name=f"{label} layer {layer}",
                legendgroup=f"drift-{label}",
                showlegend=False,
                mode="lines",
                line={"color": _layer_colour(j, len(layers)), "dash": dash},
            ),
            row=3,
            col=1,
        )


def _layout(
    fig: go.Figure, histories: Mapping[str, History], drift: str, title: str | None
) -> None:
    """Axis titles, the drift colour scale (0 to the largest drift), title and height."""
    n_drift = len(histories) if drift == "heatmap" else 1
    z_max = max(np.nanmax(drift_matrix(h)[2]) for h in histories.values())
    fig.update_yaxes(title_text="loss", row=1, col=1)
    fig.update_yaxes(title_text="L_KV", row=2, col=1)
    if drift == "lines":
        fig.update_yaxes(title_text="L_K + L_V", row=3, col=1)
    fig.update_xaxes(title_text="step", row=2 + n_drift, col=1)
    fig.update_layout(
        template=TEMPLATE,
        title={"text": html_escape(title or "Finetuning: loss, regulariser and prefix K/V drift")},
        coloraxis={
            "colorscale": "Viridis",
            "cmin": 0.0,
            "cmax": float(z_max) if np.isfinite(z_max) and z_max > 0 else 1.0,
            "colorbar": {"title": {"text": "L_K + L_V"}, "len": 0.4, "y": 0.2},
        },
        height=260 + 170 * (2 + n_drift),
        legend_title_text="run",
    )


def _layer_colour(j: int, n: int) -> str:
    from plotly.colors import sample_colorscale

    return sample_colorscale("Viridis", [j / max(n - 1, 1)])[0]


# ---------------------------------------------------------------- task vectors


def task_vector_heatmap(frame: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Per-layer cosine similarity of task vectors (finetuned minus base weights) between
    methods (the paper's Fig. 8): y = pairs ``"a vs b"``, x = layer, colour in [-1, 1]
    diverging around 0.

    ``frame``: one row per (layer, a, b) with columns ``layer``, ``a``, ``b``, ``cosine``
    (as ``piggyback_interp.analysis.task_vectors.cosine_similarity`` returns).

    Example:
        >>> import pandas as pd
        >>> frame = pd.DataFrame({"layer": [0, 1], "a": "sft", "b": "treft", "cosine": [0.9, 0.2]})
        >>> fig = task_vector_heatmap(frame)
        >>> list(fig.data[0].y), fig.data[0].z.tolist()
        (['sft vs treft'], [[0.9, 0.2]])
    """
    require_columns(frame, ["layer", "a", "b", "cosine"], "task_vector_heatmap")
    if frame.empty:
        raise ValueError("the frame has no rows")
    frame = frame.assign(pair=frame["a"].astype(str) + " vs " + frame["b"].astype(str))
    if frame.duplicated(["pair", "layer"]).any():
        raise ValueError("several rows for one (layer, a, b)")
    cos = frame["cosine"].to_numpy(dtype=float)
    if np.any(np.abs(cos[np.isfinite(cos)]) > 1 + 1e-6):
        raise ValueError("cosine similarities must lie in [-1, 1]")
    pairs = ordered(frame["pair"])
    layers = ordered(frame["layer"])
    if all(isinstance(layer, (int, np.integer)) for layer in layers):
        layers = sorted(layers)
    grid = frame.pivot(index="pair", columns="layer", values="cosine").reindex(
        index=pairs, columns=layers
    )
    z = grid.to_numpy(dtype=float)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[str(layer) for layer in layers],
            y=pairs,
            zmin=-1.0,
            zmax=1.0,
            zmid=0.0,
            colorscale="RdBu",
            colorbar={"title": {"text": "cosine"}},
            texttemplate="%{z:.2f}" if z.size <= 300 else None,
            hovertemplate="%{y}<br>layer %{x}<br>cosine %{z:.3f}<extra></extra>",
            name="cosine",
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title={"text": html_escape(title or "Task vectors: cosine similarity per layer")},
        xaxis_title="layer",
        height=max(260, 60 * len(pairs) + 180),
    )
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


__all__ = ["drift_matrix", "task_vector_heatmap", "training_curves"]
