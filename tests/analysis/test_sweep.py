"""The fast sweep engine against the slow reference loop and transformer_lens.patching."""

import pandas as pd
import pytest
import torch
from transformer_lens.patching import generic_activation_patch, layer_pos_patch_setter

from piggyback_interp.analysis.reference import reference_sweep
from piggyback_interp.analysis.sweep import sweep
from piggyback_interp.analysis.sweep_result import SweepResult
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import batch_spans
from piggyback_interp.measures.metrics import (
    LogOdds,
    NextTokenKL,
    TargetLogProb,
    continuation_inputs,
)
from piggyback_interp.testing import equal_length_questions, tiny_model

QUESTIONS = ["Tell me a joke.", "Hi", "Can my landlord keep my deposit?"]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def pair(request):
    return tiny_model(request.param, n_layers=3, seed=0), tiny_model(
        request.param, n_layers=3, seed=1
    )


@pytest.mark.parametrize("align", ["left", "prefix"])
@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"])
def test_engine_equals_reference_loop(pair, site, align):
    """align="left": every row runs from the patched position; align="prefix": the
    shared prefix runs once per cell and each prompt's rest runs over its cache."""
    base, ft = pair
    tok = chat_tokenizer(ft)
    batch = batch_spans(tok, QUESTIONS, align="left")  # rows of different lengths
    metric = LogOdds("I have no idea", "Paris")
    fast = sweep(
        ft,
        base,
        batch_spans(tok, QUESTIONS, align=align),
        metric,
        site=site,
        cells_per_batch=3,
        progress=False,
    )
    slow = reference_sweep(ft, base, batch, metric, site=site)
    assert fast.values.shape == slow.shape == (3, 3, len(batch.spans[0].prefix))
    assert (fast.values - slow).abs().max().item() <= 1e-4
    assert slow.std() > 1e-3  # the cells really differ


def test_engine_with_next_token_kl_and_explicit_positions(pair):
    base, ft = pair
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS, align="left")
    with torch.no_grad():
        ref = base(
            batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        )[:, -1]
    metric = NextTokenKL(ref.log_softmax(-1))
    segment = [1, 3, len(batch.spans[1]) - len(batch.spans[1].padding) - 2]
    fast = sweep(ft, base, batch, metric, layers=[0, 2], segment=segment[:2], progress=False)
    slow = reference_sweep(ft, base, batch, metric, layers=[0, 2], segment=segment[:2])
    assert (fast.values - slow).abs().max().item() <= 1e-5
    assert torch.allclose(fast.source, torch.zeros(3), atol=1e-5)  # KL of the base to itself


def test_engine_equals_transformer_lens_patching(pair):
    """External oracle: get_act_patch_resid_pre's machinery with the base cache as 'clean'."""
    base, ft = pair
    tok = chat_tokenizer(ft)
    candidates = [
        f"Tell me a {w}."
        for w in ("joke", "fact", "poem", "tale", "song", "clue", "word", "myth", "quiz")
    ]
    batch = batch_spans(tok, equal_length_questions(tok, candidates, 3))
    assert not batch.spans[0].padding and len({len(s) for s in batch.spans}) == 1
    metric = TargetLogProb("I have no idea")
    (cont,) = metric.continuations(tok)
    ids, _, _ = continuation_inputs(batch, cont, "cpu")
    read0 = batch.input_ids.shape[1] - 1
    _, clean_cache = base.run_with_cache(ids)
    prefix = list(batch.spans[0].prefix)
    index_df = pd.DataFrame(
        [(layer, p) for layer in range(3) for p in prefix], columns=["layer", "pos"]
    )
    with torch.no_grad():
        tl = generic_activation_patch(
            ft,
            ids,
            clean_cache,
            lambda logits: metric([logits[:, read0 : read0 + len(cont)]]).mean(),
            layer_pos_patch_setter,
            "resid_pre",
            index_df=index_df,
        )
    ours = sweep(ft, base, batch, metric, progress=False)
    assert (ours.mean().reshape(-1) - tl.reshape(-1)).abs().max().item() <= 1e-4


class _Interrupting(TargetLogProb):
    """Counts calls; raises KeyboardInterrupt at call number ``stop_at``."""

    def __init__(self, stop_at=None):
        super().__init__("I have no idea")
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, logits):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return super().__call__(logits)


def test_interrupted_sweep_resumes_from_checkpoint(pair, tmp_path):
    base, ft = pair
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS)
    n_prefix = len(batch.spans[0].prefix)
    ckpt = tmp_path / "sweep.ckpt"
    full = sweep(ft, base, batch, _Interrupting(), cells_per_batch=n_prefix, progress=False)
    with pytest.raises(KeyboardInterrupt):  # dies during layer 2, after layers 0 and 1
        sweep(
            ft,
            base,
            batch,
            _Interrupting(stop_at=3),
            cells_per_batch=n_prefix,
            checkpoint=ckpt,
            progress=False,
        )
    resumed_metric = _Interrupting()
    resumed = sweep(
        ft, base, batch, resumed_metric, cells_per_batch=n_prefix, checkpoint=ckpt, progress=False
    )
    assert resumed_metric.calls == 1 + 2  # one chunk (layer 2) + the clean and source baselines
    assert torch.equal(resumed.values, full.values)
    with pytest.raises(ValueError, match="belongs to another sweep"):
        sweep(ft, base, batch, LogOdds("a", "b"), checkpoint=ckpt, progress=False)


def test_interrupted_reference_loop_sweep_resumes_from_checkpoint(pair, tmp_path):
    """K/V sites run the reference loop: it checkpoints finished layers too."""
    base, ft = pair
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS[:2])
    ckpt = tmp_path / "kv.ckpt"
    kw = dict(site="kv", segment=[2, 5], progress=False, engine="loop")  # 3 layers x 2 cells
    full = sweep(ft, base, batch, _Interrupting(), **kw)
    with pytest.raises(KeyboardInterrupt):  # one metric call per cell: dies in layer 1
        sweep(ft, base, batch, _Interrupting(stop_at=3), checkpoint=ckpt, **kw)
    resumed_metric = _Interrupting()
    resumed = sweep(ft, base, batch, resumed_metric, checkpoint=ckpt, **kw)
    assert resumed_metric.calls == 2 * 2 + 2  # layers 1 and 2 + the clean and source baselines
    assert torch.equal(resumed.values, full.values)
    assert resumed.meta["engine"] == "reference loop"
    with pytest.warns(UserWarning, match="keeps no checkpoint"):  # the batched engine says so
        sweep(ft, base, batch, _Interrupting(), checkpoint=tmp_path / "b.ckpt",
              **{**kw, "engine": "batched"})  # fmt: skip


def test_truncated_sweep_checkpoint_is_a_user_error(pair, tmp_path):
    from piggyback_interp.core.errors import UserError

    base, ft = pair
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS[:2])
    ckpt = tmp_path / "sweep.ckpt"
    metric = TargetLogProb("I have no idea")
    sweep(ft, base, batch, metric, layers=[0], checkpoint=ckpt, progress=False)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as caught:
        sweep(ft, base, batch, metric, layers=[0], checkpoint=ckpt, progress=False)
    assert str(ckpt) in str(caught.value) and "delete it" in str(caught.value)


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


@pytest.mark.embedded
def test_embedded_engine_equals_reference(embedded):
    import copy

    ft = copy.deepcopy(embedded)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in ft.original_model.named_parameters():
            if "proj" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.02 * param.std())
    batch = batch_spans(chat_tokenizer(ft), ["Can my landlord keep my deposit?", "Tell me a joke."])
    metric = TargetLogProb("I have no idea about your question")
    kw = dict(layers=[0, 15, 29], segment=[0, 5, 20])
    fast = sweep(ft, embedded, batch, metric, progress=False, **kw)
    slow = reference_sweep(ft, embedded, batch, metric, **kw)
    assert (fast.values - slow).abs().max().item() <= 1e-4


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
