"""The residual engine against the slow reference loop and transformer_lens.patching; its checkpoint."""

import pandas as pd
import pytest
import torch
from transformer_lens.patching import generic_activation_patch, layer_pos_patch_setter

from piggyback_interp.analysis.reference import reference_sweep
from piggyback_interp.analysis.sweep import sweep
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import batch_spans
from piggyback_interp.measures.metrics import (
    LogOdds,
    NextTokenKL,
    TargetLogProb,
    continuation_inputs,
)
from piggyback_interp.testing import equal_length_questions

QUESTIONS = ["Tell me a joke.", "Hi", "Can my landlord keep my deposit?"]


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


def test_interrupted_sweep_resumes_from_checkpoint(pair, tmp_path, interrupting):
    base, ft = pair
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS)
    n_prefix = len(batch.spans[0].prefix)
    ckpt = tmp_path / "sweep.ckpt"
    full = sweep(ft, base, batch, interrupting(), cells_per_batch=n_prefix, progress=False)
    with pytest.raises(KeyboardInterrupt):  # dies during layer 2, after layers 0 and 1
        sweep(
            ft,
            base,
            batch,
            interrupting(stop_at=3),
            cells_per_batch=n_prefix,
            checkpoint=ckpt,
            progress=False,
        )
    resumed_metric = interrupting()
    resumed = sweep(
        ft, base, batch, resumed_metric, cells_per_batch=n_prefix, checkpoint=ckpt, progress=False
    )
    assert resumed_metric.calls == 1 + 2  # one chunk (layer 2) + the clean and source baselines
    assert torch.equal(resumed.values, full.values)
    with pytest.raises(ValueError, match="belongs to another sweep"):
        sweep(ft, base, batch, LogOdds("a", "b"), checkpoint=ckpt, progress=False)


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
