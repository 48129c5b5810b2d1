"""Result tables as figures: segment perturbation bars (Table 1), method comparison (Table 5)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from piggyback_interp.interventions.perturb import aggregate_trials
from piggyback_interp.measures.evaluation import Evaluation
from piggyback_interp.report.figures.style import (
    SEGMENT_ORDER,
    TEMPLATE,
    html_escape,
    ordered,
    require_columns,
)

Aggregate = Mapping[str, float | int]


def _aggregates(frame: pd.DataFrame, higher_is_better: bool) -> dict[str, Aggregate]:
    require_columns(frame, ["prompt", "segment", "trial", "score"], "segment_bars")
    out: dict[str, Aggregate] = {}
    for segment in ordered(frame["segment"], SEGMENT_ORDER):
        group = frame[frame["segment"] == segment]
        if group.duplicated(["prompt", "trial"]).any():
            raise ValueError(f"segment {segment!r} has several scores for one (prompt, trial)")
        matrix = group.pivot(index="prompt", columns="trial", values="score")
        if matrix.isna().to_numpy().any():
            raise ValueError(
                f"segment {segment!r}: not every prompt has every trial scored; "
                "score all trials (the same number per prompt) or drop the prompt"
            )
        scores = torch.tensor(matrix.to_numpy(dtype=float))
        out[str(segment)] = aggregate_trials(scores, higher_is_better=higher_is_better)
    return out


def segment_bars(
    results: pd.DataFrame | Mapping[str, Aggregate],
    *,
    higher_is_better: bool = True,
    unperturbed: float | None = None,
    score: str = "score",
    title: str | None = None,
) -> go.Figure:
    """The paper's Table 1 as bars: Best and Avg score per perturbed segment.

    ``results`` is the :func:`~piggyback_interp.interventions.perturb.trials_frame` of a perturbation
    run (``prompt``, ``segment``, ``trial``, ``score``; aggregated here with
    :func:`~piggyback_interp.interventions.perturb.aggregate_trials`) or ``{segment:
    aggregate_trials(...)}``. Error bars: ± 1 SE over prompts (``best_se`` /
    ``avg_se``; none for a single prompt). ``unperturbed``: the unperturbed prompts'
    score, drawn as a dashed line. Segments: prefix, query, postfix first, then others.

    Example:
        >>> fig = segment_bars({"prefix": {"best": 92.1, "avg": 73.2}, "query": {"best": 63.8, "avg": 36.7}})
        >>> [t.name for t in fig.data], list(fig.data[0].y)
        (['Best', 'Avg'], [92.1, 63.8])
    """
    aggs = _segment_aggregates(results, higher_is_better)
    segments = list(aggs)
    fig = go.Figure()
    for key, name, colour in (("best", "Best", "#4C78A8"), ("avg", "Avg", "#9ECAE9")):
        fig.add_trace(_segment_bar(aggs, segments, key, name, colour))
    if unperturbed is not None:
        line = {"color": "black", "dash": "dash", "width": 1}
        fig.add_hline(y=unperturbed, line=line, name="unperturbed")
        fig.add_trace(  # the line's legend entry
            go.Scatter(
                x=[None], y=[None], mode="lines", line=line, name=f"unperturbed ({unperturbed:.3g})"
            )
        )
    best_word = "highest" if higher_is_better else "lowest"
    fig.update_layout(
        template=TEMPLATE,
        barmode="group",
        title={
            "text": html_escape(
                title
                or f"Perturbing one segment: Best ({best_word} trial per prompt) and Avg, ± 1 SE over prompts"
            )
        },
        xaxis_title="perturbed segment",
        yaxis_title=html_escape(score),
        height=420,
    )
    return fig


def _segment_aggregates(
    results: pd.DataFrame | Mapping[str, Aggregate], higher_is_better: bool
) -> dict[str, Aggregate]:
    """``{segment: aggregate}`` in segment order, from a trials frame or checked aggregates."""
    if isinstance(results, pd.DataFrame):
        if results.empty:
            raise ValueError("the trials frame has no rows")
        return _aggregates(results, higher_is_better)
    if not results:
        raise ValueError("pass at least one segment: {segment: aggregate_trials(...)}")
    aggs = {str(k): v for k, v in results.items()}
    for segment, agg in aggs.items():
        if "best" not in agg or "avg" not in agg:
            raise ValueError(
                f"segment {segment!r} needs 'best' and 'avg' (aggregate_trials' output), "
                f"got {sorted(agg)}"
            )
    return {k: aggs[k] for k in ordered(aggs, SEGMENT_ORDER)}


def _segment_bar(
    aggs: Mapping[str, Aggregate], segments: list[str], key: str, name: str, colour: str
) -> go.Bar:
    """The ``key`` ("best" or "avg") bars of every segment, ± 1 SE where there is one."""
    values = [float(aggs[s][key]) for s in segments]
    ses = [float(aggs[s].get(f"{key}_se", math.nan)) for s in segments]
    has_se = any(math.isfinite(v) for v in ses)
    return go.Bar(
        x=segments,
        y=values,
        name=name,
        marker_color=colour,
        error_y={
            "type": "data",
            "array": [v if math.isfinite(v) else 0.0 for v in ses],
            "visible": has_se,
        },
        text=[f"{v:.3g}" for v in values],
        textposition="outside",
        customdata=[
            [se, aggs[s].get("n_prompts", math.nan)] for s, se in zip(segments, ses, strict=True)
        ],
        hovertemplate=(
            f"{name}, %{{x}}: %{{y:.3f}} ± %{{customdata[0]:.3f}} SE"
            " (%{customdata[1]} prompts)<extra></extra>"
        ),
    )


# ---------------------------------------------------------------- method comparison

SPLIT_NAMES = {
    "behaviour": {"on_topic": "on-topic", "off_topic": "off-topic"},
    "alignment": {"on_topic": "in-domain (on-topic)", "off_topic": "general (off-topic)"},
}
SPLIT_COLOURS = {"on_topic": "#E45756", "off_topic": "#4C78A8"}


def _summary_frame(summary: pd.DataFrame | Mapping[str, pd.DataFrame | Evaluation]) -> pd.DataFrame:
    if isinstance(summary, pd.DataFrame):
        frame = summary
    else:
        if not summary:
            raise ValueError("pass at least one method: {method: summary frame or Evaluation}")
        parts = []
        for method, item in summary.items():
            part = item.summary() if isinstance(item, Evaluation) else item
            if "method" in part.columns:
                raise ValueError(
                    f"{method!r}: the frame already has a 'method' column; pass the frame itself"
                )
            parts.append(part.assign(method=str(method)))
        frame = pd.concat(parts, ignore_index=True)
    require_columns(frame, ["method", "split", "metric", "mean"], "method_comparison")
    for column in ("se", "low", "high", "n_seeds", "n"):
        if column not in frame.columns:
            frame = frame.assign(**{column: math.nan})
    return frame


def _error(row: pd.Series) -> tuple[float, float, str]:
    """(plus, minus, words) of one summary row: SE over seeds with several seeds, else
    the bootstrap interval over responses, else nothing."""
    mean, se, low, high = (float(row[c]) for c in ("mean", "se", "low", "high"))
    seeds, n = float(row["n_seeds"]), float(row["n"])
    if math.isfinite(se) and (not math.isfinite(seeds) or seeds > 1):
        over = f" over {seeds:.0f} seeds" if math.isfinite(seeds) else ""
        return se, se, f"{mean:.3g} ± {se:.2g} SE{over}"
    if math.isfinite(low) and math.isfinite(high):
        size = f", n={n:.0f}" if math.isfinite(n) else ""
        return high - mean, mean - low, f"{mean:.3g} [{low:.3g}, {high:.3g}] 95% bootstrap CI{size}"
    return 0.0, 0.0, f"{mean:.3g}"


def _bars(
    order: Sequence[str], cells: list[pd.DataFrame], name: str, colour: str, *, legendgroup: str
) -> go.Bar:
    """One bar per method (``cells[i]``: its summary row, or empty) with asymmetric error
    bars from :func:`_error` and a hover text saying what they are."""
    errors = [_error(c.iloc[0]) if len(c) else (0.0, 0.0, "no data") for c in cells]
    return go.Bar(
        x=list(order),
        y=[float(c["mean"].iloc[0]) if len(c) else None for c in cells],
        name=name,
        legendgroup=legendgroup,
        marker_color=colour,
        error_y={
            "type": "data",
            "symmetric": False,
            "array": [e[0] for e in errors],
            "arrayminus": [e[1] for e in errors],
        },
        hovertext=[f"{name}: {e[2]}" for e in errors],
        hoverinfo="x+text",
    )


def method_comparison(
    summary: pd.DataFrame | Mapping[str, pd.DataFrame | Evaluation],
    *,
    metric: str = "behaviour",
    methods: Sequence[str] | None = None,
    em_f1: bool = True,
    title: str | None = None,
) -> go.Figure:
    """On-topic vs off-topic ``metric`` per method (Table 5), with error bars; EM-F1 below.

    ``summary``: a frame like :func:`~piggyback_interp.measures.evaluation.summarize`'s with a
    ``method`` column (e.g. :func:`~piggyback_interp.experiments.reproduce.reproduce_table5`'s,
    ``by=["setting", "method"]``: one panel per setting), or ``{method: summary frame |
    Evaluation}``. ``metric="behaviour"``: the behaviour rate; ``"alignment"``:
    in-domain vs general alignment; any other summarised metric works too. Error bars:
    ± SE over seeds where a row has several seeds, else its 95% percentile bootstrap
    interval over responses (the hover text says which). With ``em_f1`` and ``em_f1``
    rows in the summary, a second row of panels shows EM-F1 ± SE per method.

    Example:
        >>> import pandas as pd
        >>> frame = pd.DataFrame({"method": ["sft", "sft"], "split": ["on_topic", "off_topic"],
        ...                       "metric": "behaviour", "mean": [1.0, 0.68], "se": 0.03,
        ...                       "low": float("nan"), "high": float("nan"), "n_seeds": 3, "n": 52})
        >>> [list(t.y) for t in method_comparison(frame).data]
        [[1.0], [0.68]]
    """
    frame = _summary_frame(summary)
    main = frame[(frame["metric"] == metric) & frame["split"].isin(SPLIT_COLOURS)]
    if main.empty:
        available = sorted(frame.loc[frame["split"].isin(SPLIT_COLOURS), "metric"].unique())
        raise ValueError(f"no on/off-topic rows for metric {metric!r}; the summary has {available}")
    em = frame[frame["metric"] == "em_f1"] if em_f1 else frame.iloc[:0]
    order = list(methods) if methods is not None else ordered(frame["method"])
    unknown = sorted(set(order) - set(frame["method"]))
    if unknown:
        raise ValueError(f"methods {unknown} are not in the summary ({ordered(frame['method'])})")
    settings = ordered(frame["setting"]) if "setting" in frame.columns else [None]
    n_rows = 2 if not em.empty else 1
    fig = _panels(settings, n_rows)
    names = SPLIT_NAMES.get(metric, {"on_topic": "on-topic", "off_topic": "off-topic"})
    for col, setting in enumerate(settings, start=1):
        part = _of_setting(main, setting)
        for split in SPLIT_COLOURS:
            cells = [part[(part["method"] == m) & (part["split"] == split)] for m in order]
            if any(len(c) > 1 for c in cells):
                raise ValueError(f"several {metric!r} rows for one (method, split={split!r})")
            bars = _bars(order, cells, names[split], SPLIT_COLOURS[split], legendgroup=split)
            fig.add_trace(bars.update(showlegend=col == 1), row=1, col=col)
        if n_rows == 2:
            part = _of_setting(em, setting)
            cells = [part[part["method"] == m] for m in order]
            bars = _bars(order, cells, "EM-F1", "#54A24B", legendgroup="em_f1")
            fig.add_trace(bars.update(showlegend=col == 1), row=2, col=col)
    label = {"behaviour": "behaviour rate", "alignment": "alignment (0-100)"}.get(metric, metric)
    fig.update_yaxes(title_text=html_escape(label), row=1, col=1)
    if metric in ("behaviour", "misaligned") and main["mean"].between(0, 1).all():
        fig.update_yaxes(range=[0, 1.05], row=1)
    if n_rows == 2:
        fig.update_yaxes(title_text="EM-F1", row=2, col=1)
    fig.update_layout(
        template=TEMPLATE,
        barmode="group",
        title={"text": html_escape(title or f"{label.capitalize()} per method, on- vs off-topic")},
        height=380 + 260 * (n_rows - 1),
        legend_title_text="split",
    )
    return fig


def _panels(settings: list[object], n_rows: int) -> go.Figure:
    """One column of panels per setting: the metric, and EM-F1 below when ``n_rows == 2``."""
    titles = [str(s) if s is not None else "" for s in settings]
    if n_rows == 2:
        titles += [f"EM-F1 ({s})" if s is not None else "EM-F1" for s in settings]
    return make_subplots(
        rows=n_rows,
        cols=len(settings),
        subplot_titles=titles,
        shared_yaxes="rows",
        vertical_spacing=0.18,
        row_heights=[0.62, 0.38] if n_rows == 2 else None,
    )


def _of_setting(part: pd.DataFrame, setting: object) -> pd.DataFrame:
    """The rows of one setting (all rows where the summary has no ``setting``)."""
    return part if setting is None else part[part["setting"] == setting]


__all__ = ["method_comparison", "segment_bars"]
