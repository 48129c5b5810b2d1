"""Training curves and task-vector cosines from real tiny finetunes: their data equal
the logged history and the cosines of the real weight deltas."""

import doctest

import numpy as np
import pandas as pd
import pytest
import torch

import piggyback_interp.report.figures.training as training_module
from piggyback_interp.report.figures import task_vector_heatmap, training_curves


def test_training_curves_equal_history(finetuned, n_layers):
    result, folder, _, _ = finetuned["treft"]
    history = result.history
    fig = training_curves(result)
    sft, kv, heat = fig.data
    assert sft.name == "treft" and list(sft.x) == [h["step"] for h in history]
    assert list(sft.y) == [h["sft"] for h in history]
    assert list(kv.y) == [h["kv"] for h in history]
    assert heat.type == "heatmap" and list(heat.y) == [str(i) for i in range(n_layers)]
    expected = [[h["drift"][str(layer)] for h in history] for layer in range(n_layers)]
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


def _layer_cosines(deltas_a, deltas_b, n_layers):
    out = []
    for layer in range(n_layers):
        key = f".layers.{layer}."
        a = torch.cat([d.flatten() for n, d in deltas_a.items() if key in n])
        b = torch.cat([d.flatten() for n, d in deltas_b.items() if key in n])
        out.append(torch.nn.functional.cosine_similarity(a, b, dim=0).item())
    return out


def test_task_vector_heatmap_of_real_weight_deltas(finetuned, n_layers):
    rows = []
    for a, b in (("sft", "treft"), ("sft", "kl_train"), ("treft", "kl_train")):
        cos = _layer_cosines(finetuned[a][2], finetuned[b][2], n_layers)
        rows += [{"layer": i, "a": a, "b": b, "cosine": c} for i, c in enumerate(cos)]
    frame = pd.DataFrame(rows)
    fig = task_vector_heatmap(frame)
    heat = fig.data[0]
    assert list(heat.y) == ["sft vs treft", "sft vs kl_train", "treft vs kl_train"]
    assert list(heat.x) == [str(i) for i in range(n_layers)]
    np.testing.assert_allclose(
        np.asarray(heat.z), frame["cosine"].to_numpy().reshape(3, n_layers), atol=1e-12
    )
    assert (heat.zmin, heat.zmax, heat.zmid) == (-1.0, 1.0, 0.0)
    assert 0 < np.asarray(heat.z).min() <= np.asarray(heat.z).max() <= 1
    with pytest.raises(ValueError, match="missing"):
        task_vector_heatmap(frame.drop(columns="cosine"))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        task_vector_heatmap(frame.assign(cosine=2.0))


def test_doctests():
    result = doctest.testmod(training_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
