"""head_sweep against hand-written hook_z hooks."""

import pytest
import torch

from piggyback_interp.analysis.heads import head_sweep
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import batch_spans
from piggyback_interp.measures.metrics import TargetLogProb, metric_on_model
from piggyback_interp.testing import tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@torch.no_grad()
def test_head_sweep_equals_hand_hooks(arch):
    base, ft = tiny_model(arch, n_layers=2, seed=0), tiny_model(arch, n_layers=2, seed=1)
    batch = batch_spans(chat_tokenizer(ft), ["Tell me a joke.", "Can my landlord keep my deposit?"])
    metric = TargetLogProb("I have no idea")
    result = head_sweep(ft, base, batch, metric, heads=[0, 3], progress=False)
    prefix = [list(s.prefix) for s in batch.spans]
    _, cache = base.run_with_cache(
        batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    )
    for li, layer in enumerate([0, 1]):
        src = cache[f"blocks.{layer}.attn.hook_z"]  # [batch, pos, head, d_head]
        for hi, head in enumerate([0, 3]):

            def hook(act, hook, head=head, src=src):
                act = act.clone()
                for row, pos in enumerate(prefix):
                    act[row, pos, head] = src[row, pos, head]
                return act

            expected = metric_on_model(
                ft, batch, metric, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)]
            )
            assert torch.allclose(result.values[:, li, hi], expected, atol=1e-5)
    assert result.tokens == ["H0", "H3"]
    with pytest.raises(ValueError, match=r"head\(s\) \[9\] out of range"):
        head_sweep(ft, base, batch, metric, heads=[9], progress=False)
