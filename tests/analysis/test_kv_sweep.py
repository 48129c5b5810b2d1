"""kv_layer_sweep against patch_prefix(isolate=True) + metric_on_model, prompt by prompt."""

import pytest
import torch

from piggyback_interp.analysis.kv_sweep import kv_layer_sweep
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import batch_spans, chat_spans
from piggyback_interp.interventions import as_batch, patch_prefix
from piggyback_interp.measures.metrics import LogOdds, NextTokenKL, metric_on_model
from piggyback_interp.testing import tiny_model

QUESTIONS = ["Tell me a joke.", "Hi", "Can my landlord keep my deposit?"]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def pair(request):
    return tiny_model(request.param, n_layers=4, seed=0), tiny_model(
        request.param, n_layers=4, seed=1
    )


@torch.no_grad()
@pytest.mark.parametrize(("site", "window"), [("kv", 1), ("kv", 2), ("k", 1), ("v", 3)])
def test_kv_layer_sweep_equals_isolated_patches(pair, site, window):
    base, ft = pair
    tok = chat_tokenizer(ft)
    batch = batch_spans(tok, QUESTIONS, align="prefix")
    metric = LogOdds("I have no idea", "Paris")
    result = kv_layer_sweep(
        ft, base, batch, metric, site=site, window=window, windows_per_batch=2, progress=False
    )
    assert result.layers == list(range(4 - window + 1))
    for i, question in enumerate(QUESTIONS):
        spans = chat_spans(tok, question)
        one = as_batch(ft, spans)
        assert result.clean[i].item() == pytest.approx(
            metric_on_model(ft, one, metric).item(), abs=1e-4
        )
        assert result.source[i].item() == pytest.approx(
            metric_on_model(base, one, metric).item(), abs=1e-4
        )
        for j, start in enumerate(result.layers):
            with patch_prefix(ft, base, spans, site=site, layers=range(start, start + window)):
                expected = metric_on_model(ft, one, metric).item()
            assert result.values[i, j, 0].item() == pytest.approx(expected, abs=1e-4)


@torch.no_grad()
def test_all_layers_window_recovers_the_source_next_token_distribution(pair):
    """Patching every layer's prefix K/V with the SAME model as source changes nothing."""
    _, ft = pair
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS, align="prefix")
    logits = ft(
        batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    )
    metric = NextTokenKL(logits[:, -1].log_softmax(-1))
    result = kv_layer_sweep(ft, ft, batch, metric, window=4, progress=False)
    assert result.values.abs().max().item() <= 1e-5


def test_clear_errors(pair):
    base, ft = pair
    tok = chat_tokenizer(ft)
    metric = LogOdds("a", "b")
    with pytest.raises(ValueError, match="align='prefix'"):
        kv_layer_sweep(ft, base, batch_spans(tok, QUESTIONS, align="left"), metric, progress=False)
    batch = batch_spans(tok, QUESTIONS, align="prefix")
    with pytest.raises(ValueError, match="not 'resid_pre'"):
        kv_layer_sweep(ft, base, batch, metric, site="resid_pre", progress=False)
    with pytest.raises(ValueError, match="runs past layer 3"):
        kv_layer_sweep(ft, base, batch, metric, layers=[3], window=2, progress=False)


def test_interrupted_kv_layer_sweep_resumes_from_its_checkpoint(pair, tmp_path, monkeypatch):
    """Killed after the first chunk of windows: the rerun computes only the others."""
    import piggyback_interp.analysis.kv_sweep as kv_sweep_module

    base, ft = pair
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS, align="prefix")
    ckpt = tmp_path / "kv.ckpt"
    real = kv_sweep_module.run_cells
    computed: list[int] = []
    state = {"stop_at": None}

    def counting(patcher, specs, *args, **kwargs):
        if len(computed) == state["stop_at"]:
            raise KeyboardInterrupt
        computed.append(len(specs))
        return real(patcher, specs, *args, **kwargs)

    monkeypatch.setattr(kv_sweep_module, "run_cells", counting)
    kw = dict(windows_per_batch=2, progress=False)  # 4 windows: 2 chunks
    metric = LogOdds("I have no idea", "Paris")
    full = kv_layer_sweep(ft, base, batch, metric, **kw)
    assert computed == [2, 2]
    computed.clear()
    state["stop_at"] = 1
    with pytest.raises(KeyboardInterrupt):
        kv_layer_sweep(ft, base, batch, metric, checkpoint=ckpt, **kw)
    computed.clear()
    state["stop_at"] = None
    resumed = kv_layer_sweep(ft, base, batch, metric, checkpoint=ckpt, **kw)
    assert computed == [2]  # only the second chunk
    assert torch.equal(resumed.values, full.values)
    with pytest.raises(ValueError, match="belongs to another sweep"):
        kv_layer_sweep(ft, base, batch, metric, window=2, checkpoint=ckpt, **kw)
