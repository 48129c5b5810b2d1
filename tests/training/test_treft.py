"""TReFT's L_KV against hand computations; the reference is computed once; gradients."""

import pytest
import torch

from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import chat_spans
from piggyback_interp.testing import tiny_model
from piggyback_interp.training.lora import apply_lora
from piggyback_interp.training.treft import KVRegulariser, kv_reference, relative_sq_error


def test_relative_sq_error_by_hand():
    cur = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ref = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    # token 0: ||(0, 2)||^2 / ||(1, 0)||^2 = 4; token 1: 25 / 25 = 1 -> mean 2.5
    assert relative_sq_error(cur, ref).item() == pytest.approx(2.5)


def _perturb(model, seed=0, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.original_model.named_parameters():
            if "proj" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@torch.no_grad()
def test_l_kv_equals_hand_computation(arch):
    model = tiny_model(arch, n_layers=3)
    tok = chat_tokenizer(model)
    rows = [chat_spans(tok, "Hi"), chat_spans(tok, "Hi", system_prompt="You are a pirate.")]
    prefixes = [r.input_ids[: len(r.prefix)] for r in rows]
    _, init_cache = zip(*(model.run_with_cache(torch.tensor([p])) for p in prefixes), strict=True)
    ref = kv_reference(model, prefixes + prefixes)  # duplicates are computed once
    assert len(ref.values) == 2
    _perturb(model)
    key = "hook_k_normed" if arch == "qwen3" else "hook_k"  # what attention really uses
    total = 0.0
    for layer in range(3):
        per_row = []
        for i, prefix in enumerate(prefixes):
            _, cache = model.run_with_cache(torch.tensor([prefix]))
            term = 0.0
            for hook in (f"attn.{key}", "attn.hook_v"):
                name = f"blocks.{layer}.{hook}"
                cur, ini = cache[name][0], init_cache[i][name][0]
                if (
                    key == "hook_k_normed" and "k_normed" in name
                ):  # [head, pos, d] -> [pos, head, d]
                    cur, ini = cur.transpose(0, 1), ini.transpose(0, 1)
                cur, ini = cur.flatten(1), ini.flatten(1)
                term += (((cur - ini) ** 2).sum(-1) / (ini**2).sum(-1)).mean().item()
            per_row.append(term)
        total += sum(per_row) / len(per_row)
    expected = total / 3
    # the same rows in one right-padded batch
    width = max(len(r) for r in rows)
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r.ids
        mask[i, : len(r)] = 1
    reg = KVRegulariser(model, ref)
    with reg.recording():
        model(ids, attention_mask=mask)
    assert reg.loss(prefixes).item() == pytest.approx(expected, rel=1e-4)
    assert expected > 1e-3


def test_zero_at_init_and_gradients_reach_only_lora():
    model = tiny_model("llama", n_layers=2)
    spans = chat_spans(chat_tokenizer(model), "Hi")
    prefix = spans.input_ids[: len(spans.prefix)]
    ref = kv_reference(model, [prefix])
    assert all(not v.requires_grad for d in ref.values.values() for v in d.values())
    peft_model = apply_lora(model, rank=4, init_lora_weights=False)
    reg = KVRegulariser(model, ref)
    with reg.recording():
        model(spans.ids[None])
    loss = reg.loss([prefix])
    assert loss.item() > 0  # random LoRA weights moved the prefix K/V
    loss.backward()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(
        p.grad is not None
        for n, p in peft_model.named_parameters()
        if "lora_A" in n and "layers.0" in n
    )
    assert all(p.grad is None for n, p in peft_model.named_parameters() if not p.requires_grad)


@torch.no_grad()
def test_pseudo_variant_uses_unnormed_residual():
    model = tiny_model("llama", n_layers=2)
    spans = chat_spans(chat_tokenizer(model), "Hi")
    prefix = spans.input_ids[: len(spans.prefix)]
    ref = kv_reference(model, [prefix], variant="pseudo", layers=[1])
    _, cache = model.run_with_cache(torch.tensor([prefix]))
    attn = model.original_model.model.layers[1].self_attn
    hand = attn.k_proj(cache["blocks.1.hook_resid_pre"])[0]
    assert torch.allclose(ref[prefix][("k", 1)], hand, atol=1e-6)
    true_ref = kv_reference(model, [prefix], layers=[1])
    assert not torch.allclose(true_ref[prefix][("k", 1)], hand, atol=1e-3)


def test_clear_errors():
    model = tiny_model("llama", n_layers=2)
    with pytest.raises(ValueError, match="regularise the postfix"):
        kv_reference(model, [()])
    ref = kv_reference(model, [(1, 5, 6)])
    reg = KVRegulariser(model, ref)
    with pytest.raises(RuntimeError, match="no forward was recorded"):
        reg.loss([(1, 5, 6)])
    with reg.recording():
        model(torch.tensor([[1, 5, 7]]))
    with pytest.raises(KeyError, match="no reference for this prefix"):
        reg.loss([(1, 5, 7)])


@torch.no_grad()
def test_regions_compare_the_right_positions_by_hand():
    from piggyback_interp.training.batches import encode_example
    from piggyback_interp.training.treft import region_target

    model = tiny_model("llama", n_layers=2)
    tok = chat_tokenizer(model)
    chat = [
        {"role": "user", "content": "Can my landlord keep my deposit?"},
        {"role": "assistant", "content": "No idea"},
    ]
    ex = encode_example(tok, chat)
    ids = torch.tensor([ex.input_ids])
    _, cache = model.run_with_cache(ids)
    P = len(ex.spans.prefix)
    post = list(ex.spans.postfix)
    empty = list(ex.input_ids[:P]) + [ex.input_ids[p] for p in post]
    _, empty_cache = model.run_with_cache(torch.tensor([empty]))

    def hand(cur_cache, cur_pos, ref_cache, ref_pos):
        total = 0.0
        for layer in range(2):
            for hook in ("hook_k", "hook_v"):
                name = f"blocks.{layer}.attn.{hook}"
                cur = cur_cache[name][0, cur_pos].flatten(1)
                ref = ref_cache[name][0, ref_pos].flatten(1)
                total += (((cur - ref) ** 2).sum(-1) / (ref**2).sum(-1)).mean().item()
        return total / 2

    for region in ("postfix", "query", "all", (3, 5)):
        target = region_target(ex.input_ids, ex.spans, region)
        reg = KVRegulariser(model, kv_reference(model, [target.sequence]))
        with reg.recording():
            model(ids)
        got = reg.loss([target]).item()
        if region == "postfix":  # the empty-query reference differs from the real postfix
            expected = hand(cache, post, empty_cache, list(range(P, len(empty))))
            assert expected > 1e-4 and got == pytest.approx(expected, rel=1e-4)
        else:  # the example itself is the reference: zero for the initial model
            assert got == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="region must be one of prefix"):
        region_target(ex.input_ids, ex.spans, "everything")
    with pytest.raises(ValueError, match="outside the example"):
        region_target(ex.input_ids, ex.spans, (999,))


@torch.no_grad()
def test_postfix_reference_from_one_example():
    from piggyback_interp.training.batches import encode_example
    from piggyback_interp.training.treft import region_target

    model = tiny_model("qwen3", n_layers=2)
    tok = chat_tokenizer(model)
    a = encode_example(
        tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"}]
    )
    b = encode_example(
        tok,
        [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "no"}],
    )
    ref_example = (a.input_ids, a.spans)
    ta = region_target(a.input_ids, a.spans, "postfix", postfix_reference=ref_example)
    tb = region_target(b.input_ids, b.spans, "postfix", postfix_reference=ref_example)
    assert ta.sequence == tb.sequence == a.input_ids
    reg = KVRegulariser(model, kv_reference(model, [ta.sequence]))
    with reg.recording():
        model(torch.tensor([a.input_ids]))
    assert reg.loss([ta]).item() == pytest.approx(0.0, abs=1e-10)  # its own postfix
    _, ca = model.run_with_cache(torch.tensor([a.input_ids]))
    _, cb = model.run_with_cache(torch.tensor([b.input_ids]))
    pa, pb = list(a.spans.postfix), list(b.spans.postfix)
    total = 0.0
    for layer in range(2):
        for hook in ("hook_k_normed", "hook_v"):
            name = f"blocks.{layer}.attn.{hook}"
            x, y = cb[name][0], ca[name][0]
            if hook == "hook_k_normed":
                x, y = x.transpose(0, 1), y.transpose(0, 1)
            cur, ref = x[pb].flatten(1), y[pa].flatten(1)
            total += (((cur - ref) ** 2).sum(-1) / (ref**2).sum(-1)).mean().item()
    with reg.recording():
        model(torch.tensor([b.input_ids]))
    assert reg.loss([tb]).item() == pytest.approx(total / 2, rel=1e-4)
