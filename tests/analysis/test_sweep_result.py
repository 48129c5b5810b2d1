"""SweepResult: its tidy frame, parquet round trip and short repr."""

import pytest
import torch

from piggyback_interp.analysis.sweep import sweep
from piggyback_interp.analysis.sweep_result import SweepResult
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import batch_spans
from piggyback_interp.measures.metrics import (
    TargetLogProb,
)

QUESTIONS = ["Tell me a joke.", "Hi", "Can my landlord keep my deposit?"]


def test_result_frame_and_parquet_round_trip(pair, tmp_path):
    base, ft = pair
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS)
    result = sweep(ft, base, batch, TargetLogProb("I have no idea"), progress=False)
    frame = result.to_frame()
    n_prefix = len(batch.spans[0].prefix)
    assert len(frame) == 3 * 3 * n_prefix
    assert set(frame["segment"]) == {"prefix"} and frame["token"].iloc[0] == "<|im_start|>"
    row = frame[(frame.prompt == 1) & (frame.layer == 2) & (frame.position == 4)].iloc[0]
    assert row.value == pytest.approx(result.values[1, 2, 4].item())
    assert row.recovery == pytest.approx(
        ((row.value - row.clean) / (row.source - row.clean)), rel=1e-5
    )
    loaded = SweepResult.load(result.save(tmp_path / "sweep.parquet"))
    assert torch.allclose(loaded.values, result.values) and loaded.tokens == result.tokens
    assert loaded.meta["site"] == "resid_pre" and loaded.layers == [0, 1, 2]


def test_result_repr_is_short_and_names_the_best_cell():
    """A big grid prints as one line of facts; the best cell is the one planted here."""
    prompts, layers, cells = 40, 32, 30
    values = torch.zeros(prompts, layers, cells)
    values[:, 7, 4] = 0.8  # recovery 0.8: clean 0, source 1
    values[:, 3, 2] = 0.5
    result = SweepResult(
        values=values,
        clean=torch.zeros(prompts),
        source=torch.ones(prompts),
        layers=list(range(layers)),
        positions=list(range(cells)),
        tokens=["<|im_start|>" if i == 4 else f"t{i}" for i in range(cells)],
        segments=["prefix"] * cells,
        meta={"site": "resid_pre", "metric": "kl_to_base"},
    )
    text = repr(result)
    assert len(text) < 600 and "tensor(" not in text
    assert "prompts=40, layers=[0, 1, 2, …, 31] (32), cells=30" in text
    assert "site=resid_pre, metric=kl_to_base" in text
    assert "best=layer 7, position 4 '<|im_start|>' (prefix), best_recovery=0.8" in text
    page = result._repr_html_()
    assert "&#x27;&lt;|im_start|&gt;&#x27;" in page and "<|im_start|>" not in page
    rows = page.split("mean recovery")[1]
    assert rows.index("<td>7</td>") < rows.index("<td>3</td>")  # the top cells, best first
    assert page.count("<tr>") == 7 + 1 + 5  # facts, header, top 5 cells
