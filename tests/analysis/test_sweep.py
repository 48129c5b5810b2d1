"""sweep() picks the engine: K/V and head sites, the reference loop and its checkpoint, errors."""

import pytest
import torch

from piggyback_interp.analysis.sweep import sweep
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import batch_spans
from piggyback_interp.measures.metrics import (
    TargetLogProb,
)

QUESTIONS = ["Tell me a joke.", "Hi", "Can my landlord keep my deposit?"]


def test_interrupted_reference_loop_sweep_resumes_from_checkpoint(pair, tmp_path, interrupting):
    """K/V sites run the reference loop: it checkpoints finished layers too."""
    base, ft = pair
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS[:2])
    ckpt = tmp_path / "kv.ckpt"
    kw = dict(site="kv", segment=[2, 5], progress=False, engine="loop")  # 3 layers x 2 cells
    full = sweep(ft, base, batch, interrupting(), **kw)
    with pytest.raises(KeyboardInterrupt):  # one metric call per cell: dies in layer 1
        sweep(ft, base, batch, interrupting(stop_at=3), checkpoint=ckpt, **kw)
    resumed_metric = interrupting()
    resumed = sweep(ft, base, batch, resumed_metric, checkpoint=ckpt, **kw)
    assert resumed_metric.calls == 2 * 2 + 2  # layers 1 and 2 + the clean and source baselines
    assert torch.equal(resumed.values, full.values)
    assert resumed.meta["engine"] == "reference loop"
    with pytest.warns(UserWarning, match="keeps no checkpoint"):  # the batched engine says so
        sweep(ft, base, batch, interrupting(), checkpoint=tmp_path / "b.ckpt",
              **{**kw, "engine": "batched"})  # fmt: skip


def test_clear_errors(pair):
    base, ft = pair
    tok = chat_tokenizer(ft)
    metric = TargetLogProb("I have no idea")
    with pytest.raises(ValueError, match="reference loop, which needs"):
        sweep(
            ft,
            base,
            batch_spans(tok, QUESTIONS, align="prefix"),
            metric,
            site="kv",
            engine="loop",
            progress=False,
        )
    with pytest.raises(ValueError, match="out of range"):
        sweep(ft, base, batch_spans(tok, QUESTIONS), metric, layers=[5], progress=False)


@torch.no_grad()
@pytest.mark.parametrize("engine", ["batched", "loop"])
@pytest.mark.parametrize("site", ["kv", "k", "z"])
def test_kv_and_head_output_sweeps_equal_single_patches(pair, site, engine):
    """K/V and z sweeps (the batched engine and the reference loop): each cell equals
    one patch_prefix at that (layer, position) on that prompt alone (K/V isolated)."""
    from piggyback_interp.core.spans import chat_spans
    from piggyback_interp.interventions import as_batch, patch_prefix
    from piggyback_interp.measures.metrics import metric_on_model

    base, ft = pair
    tok = chat_tokenizer(ft)
    batch = batch_spans(tok, QUESTIONS[:2])
    metric = TargetLogProb("I have no idea")
    result = sweep(
        ft, base, batch, metric, site=site, layers=[0, 2], segment=[2, 5], engine=engine,
        progress=False,
    )  # fmt: skip
    names = {"batched": "batched", "loop": "reference loop"}
    assert result.meta["engine"] == names[engine] and result.positions == [2, 5]
    for row, question in enumerate(QUESTIONS[:2]):
        spans = chat_spans(tok, question)
        for li, layer in enumerate([0, 2]):
            for ci, pos in enumerate([2, 5]):
                with patch_prefix(ft, base, spans, site=site, layers=[layer], segment=[pos]):
                    expected = metric_on_model(ft, as_batch(ft, spans), metric).item()
                assert result.values[row, li, ci].item() == pytest.approx(expected, abs=1e-4)
