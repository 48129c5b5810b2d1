"""Figures built from real results on tiny models: their DATA equals the results; saved
HTML is standalone and renders in headless Chromium; PNG export works offline."""

import plotly.io as pio

RENDERER, TEMPLATE = pio.renderers.default, pio.templates.default  # before importing figures

import math  # noqa: E402
import re  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from piggyback_interp.analysis.kv_sweep import kv_layer_sweep  # noqa: E402
from piggyback_interp.analysis.sweep import sweep  # noqa: E402
from piggyback_interp.core.data import ChatDataset  # noqa: E402
from piggyback_interp.core.models import chat_tokenizer  # noqa: E402
from piggyback_interp.core.spans import batch_spans, chat_spans  # noqa: E402
from piggyback_interp.interventions.controls import compare_controls  # noqa: E402
from piggyback_interp.interventions.perturb import aggregate_trials, perturb_segments, trials_frame  # noqa: E402
from piggyback_interp.measures.evaluation import evaluate, summarize  # noqa: E402
from piggyback_interp.measures.judges import JudgeScore  # noqa: E402
from piggyback_interp.measures.metrics import LogOdds  # noqa: E402
from piggyback_interp.measures.settings import SettingData, setting_data  # noqa: E402
from piggyback_interp.report.figures import (  # noqa: E402
    check_html_renders,
    layer_recovery_curve,
    method_comparison,
    patching_heatmap,
    png_stats,
    save_figure,
    segment_bars,
    task_vector_heatmap,
    training_curves,
)
from piggyback_interp.report.figures import save as figure_save  # noqa: E402
from piggyback_interp.report.figures.style import display_token  # noqa: E402
from piggyback_interp.testing import equal_length_questions, tiny_model  # noqa: E402
from piggyback_interp.training import FinetuneConfig, finetune  # noqa: E402

CANDIDATES = [
    "Tell me a joke.",
    "Can my landlord keep my deposit?",
    "How do I make friends?",
    "Is a verbal contract binding?",
    "What is the capital of France?",
]
METRIC = LogOdds("I have no idea", "Paris")
N_LAYERS = 3


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama", n_layers=N_LAYERS, seed=0), tiny_model(
        "llama", n_layers=N_LAYERS, seed=1
    )


@pytest.fixture(scope="module")
def questions(pair):
    return equal_length_questions(chat_tokenizer(pair[1]), CANDIDATES, 2)


@pytest.fixture(scope="module")
def sweep_result(pair, questions):
    """resid_pre patched at every position (prefix, query and postfix) of two prompts."""
    base, ft = pair
    batch = batch_spans(chat_tokenizer(ft), questions, align="left")
    every = list(range(len(batch.spans[0])))
    return sweep(ft, base, batch, METRIC, segment=every, progress=False), batch


@pytest.fixture(scope="module")
def kv_result(pair):
    base, ft = pair
    batch = batch_spans(chat_tokenizer(ft), CANDIDATES[:3], align="prefix")
    return kv_layer_sweep(ft, base, batch, METRIC, progress=False)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """Three real full finetunes of the same tiny model (4 steps each); TReFT's folder
    keeps finetune.json."""
    records = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [(q, "I have no idea about your question") for q in CANDIDATES[:4]] * 2
    ]
    data = ChatDataset.from_records(records)
    initial = {
        n: p.detach().clone()
        for n, p in tiny_model("llama", n_layers=N_LAYERS).original_model.named_parameters()
    }
    out = {}
    for method in ("sft", "treft", "kl_train"):
        model = tiny_model("llama", n_layers=N_LAYERS, seed=0)
        config = FinetuneConfig(
            method=method, lora_rank=None, lr=3e-3, epochs=2, batch_size=4, export="none"
        )
        folder = tmp_path_factory.mktemp(method)
        result = finetune(model, data, config, out_dir=folder, progress=False)
        deltas = {
            n: p.detach() - initial[n]
            for n, p in model.original_model.named_parameters()
            if n in initial
        }
        out[method] = (result, folder, deltas, model)
    return out


# ---------------------------------------------------------------- patching heatmap


def test_patching_heatmap_data_tokens_segments(sweep_result):
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
    assert list(heat.y) == [str(layer) for layer in range(N_LAYERS)]
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


def test_layer_recovery_curve_from_compare_controls(pair):
    """Prefix vs query / random-position controls at two layers, over three prompts."""
    base, ft = pair
    tok = chat_tokenizer(ft)
    frames = []
    for i, question in enumerate(CANDIDATES[:3]):
        spans = chat_spans(tok, question)
        for layer in (0, N_LAYERS - 1):
            frame = compare_controls(
                ft,
                base,
                spans,
                METRIC,
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
    assert list(lines["prefix"].x) == [0, N_LAYERS - 1]
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


# ---------------------------------------------------------------- segment bars


def test_segment_bars_equal_aggregate_trials(pair):
    _, model = pair
    tok = chat_tokenizer(model)
    target = tok.convert_tokens_to_ids("I") if "I" in tok.get_vocab() else 1
    per_prompt, scores = [], []
    for question in CANDIDATES[:3]:
        side = perturb_segments(model, chat_spans(tok, question), trials=4, seed=0)
        row = [p for name in ("prefix", "query", "postfix") for p in side[name]]
        with torch.no_grad():  # the perturbed prompt's log-prob of a fixed next token
            logits = torch.stack([model(p.ids[None])[0, -1] for p in row])
        scores.append(logits.log_softmax(-1)[:, target])
        per_prompt.append(row)
    frame = trials_frame(per_prompt, torch.stack(scores))
    fig = segment_bars(frame, unperturbed=-3.0)
    best, avg, line = fig.data
    assert (best.name, avg.name, line.name) == ("Best", "Avg", "unperturbed (-3)")
    assert list(best.x) == ["prefix", "query", "postfix"]
    for j, segment in enumerate(best.x):
        group = frame[frame["segment"] == segment]
        agg = aggregate_trials(
            torch.tensor(group.pivot(index="prompt", columns="trial", values="score").to_numpy())
        )
        assert best.y[j] == pytest.approx(agg["best"]) and avg.y[j] == pytest.approx(agg["avg"])
        assert best.error_y.array[j] == pytest.approx(agg["best_se"])
        assert avg.error_y.array[j] == pytest.approx(agg["avg_se"])
    assert fig.layout.shapes[0].y0 == -3.0  # the unperturbed line
    aggs = {
        s: aggregate_trials(
            torch.tensor(g.pivot(index="prompt", columns="trial", values="score").to_numpy())
        )
        for s, g in frame.groupby("segment")
    }
    again = segment_bars(aggs)  # {segment: aggregate} gives the same bars, same order
    assert list(again.data[0].x) == list(best.x)
    np.testing.assert_allclose(again.data[0].y, best.y)
    with pytest.raises(ValueError, match="every trial"):
        segment_bars(frame.iloc[1:])
    with pytest.raises(ValueError, match="'best' and 'avg'"):
        segment_bars({"prefix": {"mean": 1.0}})


# ---------------------------------------------------------------- method comparison


class _WordCountJudge:
    """A deterministic judge: 10 x the answer's word count, capped at 100."""

    judge_id = "test:word-count"

    def score_many(self, questions, answers):
        return [JudgeScore(min(100.0, 10.0 * len(a.split())), "score", 1.0) for a in answers]


def _small(name, n=3):
    full = setting_data(name)
    return SettingData(full.setting, full.train, full.test_on_topic[:n], full.test_off_topic[:n])


def test_method_comparison_equals_summary(pair, finetuned):
    base, _ = pair
    models = {"initial": base, "sft": finetuned["sft"][3], "treft": finetuned["treft"][3]}
    frames = []
    for method, model in models.items():
        result = evaluate(
            model,
            _small("abstention"),
            judge=_WordCountJudge(),
            seeds=(0, 1),
            temperature=1.0,
            max_new_tokens=5,
        )
        frames.append(result.responses.assign(method=method))
    responses = pd.concat(frames, ignore_index=True)
    summary = summarize(responses, ["behaviour", "alignment"], by=["method"])
    rows = summary.set_index(["method", "split", "metric"])
    fig = method_comparison(summary)
    on, off, em = fig.data
    assert (on.name, off.name, em.name) == ("on-topic", "off-topic", "EM-F1")
    assert list(on.x) == list(models)
    for trace, split in ((on, "on_topic"), (off, "off_topic")):
        for j, method in enumerate(trace.x):
            row = rows.loc[(method, split, "behaviour")]
            assert trace.y[j] == pytest.approx(row["mean"])
            assert trace.error_y.array[j] == pytest.approx(row["se"])  # 2 seeds: SE
            assert trace.error_y.arrayminus[j] == pytest.approx(row["se"])
    for j, method in enumerate(em.x):
        assert em.y[j] == pytest.approx(rows.loc[(method, "both", "em_f1"), "mean"])
    assert em.yaxis == "y2"  # its own row of panels
    align = method_comparison(summary, metric="alignment", em_f1=False)
    assert [t.name for t in align.data] == ["in-domain (on-topic)", "general (off-topic)"]
    assert align.data[1].y[0] == pytest.approx(
        rows.loc[("initial", "off_topic", "alignment"), "mean"]
    )
    with pytest.raises(ValueError, match="no on/off-topic rows for metric 'kl'"):
        method_comparison(summary, metric="kl")
    with pytest.raises(ValueError, match="not in the summary"):
        method_comparison(summary, methods=["dpo"])


def test_method_comparison_one_seed_uses_bootstrap_ci_and_facets(pair, finetuned):
    base, _ = pair
    frames, evaluations = [], {}
    for setting in ("abstention", "refusal"):
        for method, model in (("initial", base), ("sft", finetuned["sft"][3])):
            result = evaluate(model, _small(setting, 4), max_new_tokens=4)
            frames.append(result.responses.assign(method=method, setting=setting))
            if setting == "refusal":
                evaluations[method] = result
    summary = summarize(
        pd.concat(frames, ignore_index=True), ["behaviour"], by=["setting", "method"]
    )
    fig = method_comparison(summary)
    assert [a.text for a in fig.layout.annotations] == ["abstention", "refusal"]
    assert len(fig.data) == 4  # 2 settings x 2 splits, no EM-F1 rows
    refusal_off = fig.data[3]
    assert refusal_off.xaxis == "x2"
    rows = summary.set_index(["setting", "method", "split"])
    for j, method in enumerate(refusal_off.x):
        row = rows.loc[("refusal", method, "off_topic")]
        assert math.isnan(row["se"])  # one seed: no SE, so the bootstrap interval
        assert refusal_off.y[j] == pytest.approx(row["mean"])
        assert refusal_off.error_y.array[j] == pytest.approx(row["high"] - row["mean"])
        assert refusal_off.error_y.arrayminus[j] == pytest.approx(row["mean"] - row["low"])
        assert "bootstrap" in refusal_off.hovertext[j]
    direct = method_comparison(evaluations)  # {method: Evaluation}: the same bars
    assert list(direct.data[1].y) == list(refusal_off.y)
    assert list(direct.data[1].error_y.array) == list(refusal_off.error_y.array)


# ---------------------------------------------------------------- training and task vectors


def test_training_curves_equal_history(finetuned):
    result, folder, _, _ = finetuned["treft"]
    history = result.history
    fig = training_curves(result)
    sft, kv, heat = fig.data
    assert sft.name == "treft" and list(sft.x) == [h["step"] for h in history]
    assert list(sft.y) == [h["sft"] for h in history]
    assert list(kv.y) == [h["kv"] for h in history]
    assert heat.type == "heatmap" and list(heat.y) == [str(i) for i in range(N_LAYERS)]
    expected = [[h["drift"][str(layer)] for h in history] for layer in range(N_LAYERS)]
    np.testing.assert_allclose(np.asarray(heat.z), expected)
    # zero at the start up to float rounding (~1e-14 on some CPUs); the prefix really drifts
    assert abs(history[0]["kv"]) < 1e-10 and history[-1]["kv"] > 1e-6
    from_file = training_curves(folder / "finetune.json")  # what finetune wrote
    assert list(from_file.data[0].y) == list(sft.y)
    runs = {m: finetuned[m][0] for m in ("sft", "treft", "kl_train")}
    several = training_curves(runs)
    assert sum(t.type == "heatmap" for t in several.data) == 3
    kl = next(t for t in several.data if t.name == "kl_train KL")
    assert list(kl.y) == [h["kl"] for h in finetuned["kl_train"][0].history]
    lines = training_curves(runs, drift="lines")
    assert sum(t.name.endswith("layer 0") for t in lines.data) == 3
    with pytest.raises(ValueError, match="drift must be"):
        training_curves(result, drift="bars")
    with pytest.raises(ValueError, match="history entries need"):
        training_curves({"x": [{"step": 1}]})


def _layer_cosines(deltas_a, deltas_b):
    out = []
    for layer in range(N_LAYERS):
        key = f".layers.{layer}."
        a = torch.cat([d.flatten() for n, d in deltas_a.items() if key in n])
        b = torch.cat([d.flatten() for n, d in deltas_b.items() if key in n])
        out.append(torch.nn.functional.cosine_similarity(a, b, dim=0).item())
    return out


def test_task_vector_heatmap_of_real_weight_deltas(finetuned):
    rows = []
    for a, b in (("sft", "treft"), ("sft", "kl_train"), ("treft", "kl_train")):
        cos = _layer_cosines(finetuned[a][2], finetuned[b][2])
        rows += [{"layer": i, "a": a, "b": b, "cosine": c} for i, c in enumerate(cos)]
    frame = pd.DataFrame(rows)
    fig = task_vector_heatmap(frame)
    heat = fig.data[0]
    assert list(heat.y) == ["sft vs treft", "sft vs kl_train", "treft vs kl_train"]
    assert list(heat.x) == [str(i) for i in range(N_LAYERS)]
    np.testing.assert_allclose(
        np.asarray(heat.z), frame["cosine"].to_numpy().reshape(3, N_LAYERS), atol=1e-12
    )
    assert (heat.zmin, heat.zmax, heat.zmid) == (-1.0, 1.0, 0.0)
    assert 0 < np.asarray(heat.z).min() <= np.asarray(heat.z).max() <= 1
    with pytest.raises(ValueError, match="missing"):
        task_vector_heatmap(frame.drop(columns="cosine"))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        task_vector_heatmap(frame.assign(cosine=2.0))


# ---------------------------------------------------------------- saving and rendering


def _all_figures(sweep_result, kv_result, finetuned):
    return {
        "heatmap": patching_heatmap(sweep_result[0]),
        "curve": layer_recovery_curve({"prefix": kv_result}),
        "bars": segment_bars(
            {"prefix": {"best": 0.9, "avg": 0.7}, "query": {"best": 0.6, "avg": 0.4}}
        ),
        "training": training_curves(finetuned["treft"][0]),
    }


def test_save_figure_html_is_standalone_and_png_is_a_real_image(tmp_path, sweep_result):
    fig = patching_heatmap(sweep_result[0])
    paths = save_figure(fig, tmp_path / "heatmap.html", width=360, height=240)
    assert [p.name for p in paths] == ["heatmap.html", "heatmap.png"]
    html = paths[0].read_text("utf-8")
    assert len(html) > 3_000_000 and 'src="https://cdn.plot.ly' not in html
    assert not re.search(r"<script[^>]*\bsrc=", html)  # plotly.js inline, nothing fetched
    assert '"1 system"' in html and "piggyback-heatmap" in html  # its own data and div
    stats = png_stats(paths[1].read_bytes())
    assert (stats["width"], stats["height"]) == (360, 240)
    assert stats["std"] > 5 and stats["non_background"] > 0.1 and stats["colours"] > 20


def test_save_figure_without_static_export_writes_html_and_warns(tmp_path, monkeypatch):
    fig = go.Figure(go.Bar(y=[1, 2]))
    assert save_figure(fig, tmp_path / "a", png=False) == [tmp_path / "a.html"]
    monkeypatch.setattr(figure_save, "kaleido_legacy_available", lambda: False)

    def no_chrome(*args, **kwargs):
        raise RuntimeError("Kaleido requires Google Chrome to be installed")

    monkeypatch.setattr(go.Figure, "to_image", no_chrome)
    with pytest.warns(RuntimeWarning, match="kaleido 0.2.1"):
        assert save_figure(fig, tmp_path / "b") == [tmp_path / "b.html"]
    with pytest.raises(RuntimeError, match="no offline PNG export"):
        save_figure(fig, tmp_path / "c", png=True)
    with pytest.raises((ValueError, TypeError), match="Figure"):
        save_figure({"data": []}, tmp_path / "d")


def test_saved_html_renders_in_headless_chromium(tmp_path, sweep_result, kv_result, finetuned):
    """As a user would: each saved file opened in a browser, its own plotly.js plotting it."""
    figures = _all_figures(sweep_result, kv_result, finetuned)
    paths = [save_figure(fig, tmp_path / name, png=False)[0] for name, fig in figures.items()]
    cdn = tmp_path / "needs_cdn.html"
    figures["bars"].write_html(cdn, include_plotlyjs="cdn")
    reports = {r["path"]: r for r in check_html_renders([*paths, cdn], width=500, height=350)}
    for path in paths:
        report = reports[str(path)]
        assert report["ok"], report
        assert report["plotly_version"].split(".")[0] >= "3" and report["png"]["std"] > 5
    texts = reports[str(tmp_path / "heatmap.html")]["texts"]
    assert "0 <|im_start|>" in texts and {"prefix", "query", "postfix"} <= set(texts)
    assert reports[str(tmp_path / "training.html")]["traces"] == ["scatter", "scatter", "heatmap"]
    blocked = reports[str(cdn)]
    assert not blocked["ok"] and any("cdn.plot.ly" in e for e in blocked["errors"]), blocked


def test_no_global_renderer_or_template_changed(sweep_result, kv_result, finetuned, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fig in _all_figures(sweep_result, kv_result, finetuned).values():
            save_figure(fig, tmp_path / "x", png=False)
            assert fig.layout.template.layout.paper_bgcolor is not None  # each figure's own
    assert (pio.renderers.default, pio.templates.default) == (RENDERER, TEMPLATE)


@pytest.mark.parametrize("name", ["__init__", "patching", "results", "training", "save"])
def test_doctests(name):
    import doctest
    import importlib

    module = importlib.import_module(
        "piggyback_interp.report.figures" + ("" if name == "__init__" else f".{name}")
    )
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
