"""The map's phase diagram: behaviour and carrier shares against training strength."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from piggyback_interp.report.figures.style import TEMPLATE, colour_map, require_columns

SERIES = {
    "on_topic": "on-topic rate (greedy)",
    "off_topic": "off-topic rate (greedy)",
    "off_p_target": "off-topic P(target)",
    "template_prob": "share closed by base template K/V (P)",
    "template_query_prob": "same count of query K/V (control)",
    "gen_last_prob": "best layer, base resid at last postfix (P)",
}


def phase_diagram(
    table: pd.DataFrame, *, method: str = "sft", title: str | None = None
) -> go.Figure:
    """One panel per trained part; training strength (lr x epochs, in grid order) on x;
    rates, P(target) and carrier shares (probability space) on y, mean over seeds with
    the seeds' range as error bars.

    Example:
        >>> table = pd.DataFrame({"trained": "full", "point": ["1e-5x1", "3e-5x1"],
        ...     "lr": [1e-5, 3e-5], "epochs": 1, "method": "sft", "seed": 0,
        ...     **{k: [0.1, 0.9] for k in SERIES}})
        >>> [t.name for t in phase_diagram(table).data][:2]
        ['on-topic rate (greedy)', 'off-topic rate (greedy)']
    """
    require_columns(table, ["trained", "point", "lr", "epochs", "method", *SERIES], "phase_diagram")
    rows = table[table["method"] == method]
    if rows.empty:
        raise ValueError(f"phase_diagram: no cells of method {method!r}")
    parts = list(dict.fromkeys(rows["trained"]))
    fig = make_subplots(rows=1, cols=len(parts), subplot_titles=parts, shared_yaxes=True)
    colours = colour_map(list(SERIES))
    for col, part in enumerate(parts, start=1):
        cells = rows[rows["trained"] == part].assign(steps_rank=lambda f: f["lr"] * f["epochs"])
        order = cells.drop_duplicates("point").sort_values(["steps_rank", "lr"])["point"].tolist()
        grouped = cells.groupby("point")[list(SERIES)]
        mean, low, high = grouped.mean(), grouped.min(), grouped.max()
        for key, label in SERIES.items():
            y = mean.loc[order, key]
            fig.add_trace(
                go.Scatter(
                    x=order,
                    y=y,
                    name=label,
                    legendgroup=key,
                    showlegend=col == 1,
                    mode="lines+markers",
                    line={"color": colours[key], "dash": "dot" if "query" in key else "solid"},
                    error_y={
                        "type": "data",
                        "symmetric": False,
                        "array": (high.loc[order, key] - y).tolist(),
                        "arrayminus": (y - low.loc[order, key]).tolist(),
                    },
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text="lr x epochs", row=1, col=col)
    fig.update_yaxes(title_text="rate / P / share of gap", row=1, col=1)
    fig.update_layout(
        template=TEMPLATE,
        title=title or f"Where the behaviour lives ({method}): strength vs carriers",
        height=460,
        width=420 * len(parts) + 200,
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


__all__ = ["phase_diagram"]
