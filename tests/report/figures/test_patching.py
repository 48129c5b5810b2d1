"""Patching figures from real sweeps of tiny models: the heatmap's and the recovery
curves' data equal the results."""

import doctest
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import piggyback_interp.report.figures.patching as patching_module
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import chat_spans
from piggyback_interp.interventions.controls import compare_controls
from piggyback_interp.report.figures import layer_recovery_curve, patching_heatmap
from piggyback_interp.report.figures.style import display_token


def test_patching_heatmap_data_tokens_segments(sweep_result, n_layers):
    result, batch = sweep_result
    fig = patching_heatmap(result)
    heat = fig.data[0]
    assert isinstance(fig, go.Figure) and heat.type == "heatmap"
    expected = result.recovery().mean(0)  # [layers, positions]: no NaN here
    assert not torch.isnan(expected).any()
    np.testing.assert_allclose(
        np.asarray(heat.z, dtype=float), expected.double().numpy(), atol=1e-6
    )
    assert heat.zmid == 0.0 and heat.colorscale[0][1] != heat.colorscale[-1][1]
    assert list(heat.y) == [str(layer) for layer in range(n_layers)]
    ticks = list(fig.layout.xaxis.ticktext)
    assert list(fig.layout.xaxis.tickvals) == list(range(len(result.tokens)))
    assert ticks == [
        f"{p} {display_token(t)}".replace("<", "&lt;").replace(">", "&gt;")
        for p, t in zip(result.positions, result.tokens, strict=True)
    ]
    assert ticks[0] == "0 &lt;|im_start|&gt;" and len(set(ticks)) == len(ticks)
    spans = batch.spans[0]
    shapes = {s.name: (s.x0, s.x1) for s in fig.layout.shapes if s.name.startswith("segment:")}
    for name in ("prefix", "query", "postfix"):
        seg = getattr(spans, name)
        assert shapes[f"segment:{name}"] == (seg.start - 0.5, seg.stop - 1 + 0.5)
    boundaries = sorted(s.x0 for s in fig.layout.shapes if s.name == "segment boundary")
    assert boundaries == [spans.query.start - 0.5, spans.postfix.start - 0.5]


def test_patching_heatmap_raw_values_and_one_prompt(sweep_result):
    result, _ = sweep_result
    fig = patching_heatmap(result, value="value")
    assert fig.data[0].zmid == pytest.approx(result.clean.mean().item())
    np.testing.assert_allclose(np.asarray(fig.data[0].z), result.values.mean(0).numpy(), atol=1e-5)
    one = patching_heatmap(result, prompt=1)
    np.testing.assert_allclose(np.asarray(one.data[0].z), result.recovery()[1].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="value must be"):
        patching_heatmap(result, value="logits")
    with pytest.raises(ValueError, match=r"prompt must be in 0\.\.1"):
        patching_heatmap(result, prompt=2)


# ---------------------------------------------------------------- recovery curves


def _band(mean, se):
    return np.concatenate([mean + 1.959963984540054 * se, (mean - 1.959963984540054 * se)[::-1]])


def test_layer_recovery_curve_from_sweeps(kv_result, sweep_result):
    sweep_res, _ = sweep_result
    fig = layer_recovery_curve({"prefix": kv_result, "every position": sweep_res})
    lines = {t.name: t for t in fig.data if t.mode == "lines+markers"}
    bands = {t.name: t for t in fig.data if t.fill == "toself"}
    rec = kv_result.recovery()[:, :, 0].double()  # [prompts, windows]: its one cell
    mean, se = rec.mean(0).numpy(), (rec.std(0) / math.sqrt(len(rec))).numpy()
    assert list(lines["prefix"].x) == kv_result.layers
    np.testing.assert_allclose(lines["prefix"].y, mean, atol=1e-9)
    np.testing.assert_allclose(bands["prefix ± 1.96 SE"].y, _band(mean, se), atol=1e-9)
    per_layer = sweep_res.recovery().double().mean(2)  # mean over the swept positions
    np.testing.assert_allclose(lines["every position"].y, per_layer.mean(0).numpy(), atol=1e-9)


def test_layer_recovery_curve_from_compare_controls(pair, n_layers, candidates, metric):
    """Prefix vs query / random-position controls at two layers, over three prompts."""
    base, ft = pair
    tok = chat_tokenizer(ft)
    frames = []
    for i, question in enumerate(candidates[:3]):
        spans = chat_spans(tok, question)
        for layer in (0, n_layers - 1):
            frame = compare_controls(
                ft,
                base,
                spans,
                metric,
                layers=layer,
                n=4,
                controls=("query", "random"),
                noise=False,
                seed=0,
            )
            frames.append(frame.assign(layer=layer, prompt=i))
    tidy = pd.concat(frames, ignore_index=True)
    fig = layer_recovery_curve(tidy)
    lines = {t.name: t for t in fig.data if t.mode == "lines+markers"}
    assert list(lines) == ["prefix", "query", "random"]
    assert list(lines["prefix"].x) == [0, n_layers - 1]
    grouped = tidy.groupby(["positions_from", "layer"])["recovery"]
    for name, line in lines.items():
        mean = grouped.mean().loc[name].to_numpy()
        se = (grouped.std(ddof=1) / np.sqrt(grouped.count())).loc[name].to_numpy()
        np.testing.assert_allclose(line.y, mean, atol=1e-9)
        band = next(t for t in fig.data if t.name == f"{name} ± 1.96 SE")
        np.testing.assert_allclose(band.y, _band(mean, se), atol=1e-9)
    with pytest.raises(ValueError, match="replicate"):
        layer_recovery_curve(tidy.assign(prompt=0))
    with pytest.raises(ValueError, match="'condition' column"):
        layer_recovery_curve(tidy.drop(columns="positions_from"))
    with pytest.raises(ValueError, match=r"\[prompts, layers\]"):
        layer_recovery_curve({"prefix": torch.zeros(3)})
    with pytest.raises(ValueError, match="at least one"):
        layer_recovery_curve({})


def test_doctests():
    result = doctest.testmod(patching_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
