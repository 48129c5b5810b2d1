"""The carrier scan's bars: each template segment against its matched controls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from piggyback_interp.report.figures.style import (
    SEGMENT_ORDER,
    TEMPLATE,
    Z95,
    colour_map,
    mean_se,
    ordered,
    require_columns,
)

CONDITION_ORDER = ("all", "matched", "prefix", "postfix", "query", "noise")


def carrier_bars(
    frame: pd.DataFrame,
    *,
    x: str = "segment",
    group: str = "condition",
    value: str = "recovery",
    title: str | None = None,
    yaxis: str | None = None,
) -> go.Figure:
    """Mean ``value`` per (``x``, ``group``) with 95% error bars over prompts.

    Rows of the same prompt (e.g. perturbation trials) are averaged first, so the error
    bar is ± 1.96 SE over prompts. For :func:`~piggyback_interp.experiments.scan_experiments.segment_patching`
    use the defaults; for :func:`~piggyback_interp.experiments.scan_experiments.perturbation_effects` use
    ``x="control_for", group="segment", value="reduction"``.

    Example:
        >>> frame = pd.DataFrame({"prompt": [0, 0, 1, 1], "segment": "prefix",
        ...                       "condition": ["all", "query"] * 2, "recovery": [0.8, 0.1, 0.6, 0.3]})
        >>> fig = carrier_bars(frame)
        >>> [t.name for t in fig.data], [round(y, 2) for y in fig.data[0].y]
        (['all', 'query'], [0.7])
    """
    require_columns(frame, [x, group, value, "prompt"], "carrier_bars")
    fig = go.Figure()
    if frame.empty:
        raise ValueError("carrier_bars: the frame has no rows")
    per_prompt = frame.groupby([x, group, "prompt"], sort=False)[value].mean().reset_index()
    xs = ordered(per_prompt[x], SEGMENT_ORDER)
    groups = ordered(per_prompt[group], CONDITION_ORDER)
    colours = colour_map(groups)
    for label in groups:
        means, errors, hover = [], [], []
        for xv in xs:
            cell = per_prompt[(per_prompt[x] == xv) & (per_prompt[group] == label)][value]
            mean, se, n = mean_se(cell.to_numpy(float)[:, None])
            means.append(float(mean[0]) if n[0] else None)
            errors.append(float(Z95 * se[0]) if np.isfinite(se[0]) else 0.0)
            hover.append(f"{label}: {mean[0]:.3g} ± {Z95 * se[0]:.2g} (95%, {n[0]} prompts)")
        fig.add_bar(
            x=[str(v) for v in xs],
            y=means,
            name=str(label),
            marker_color=colours[label],
            error_y={"type": "data", "array": errors},
            hovertext=hover,
            hoverinfo="x+text",
        )
    fig.update_layout(
        template=TEMPLATE,
        barmode="group",
        title=title,
        yaxis_title=yaxis or value,
        legend_title=group,
        height=380,
        margin={"l": 60, "r": 20, "t": 50 if title else 20, "b": 40},
    )
    return fig


__all__ = ["carrier_bars"]
