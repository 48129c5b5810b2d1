"""The batched K/V and head engine against the loops and independent oracles.

Oracles written here, naively: an HF cache transplant (the finetuned model's prefix
DynamicCache with chosen entries overwritten by the base's, then the rest of the
prompt over it) for isolated K/V patches, and TransformerLens-style hooks on
``hook_k``/``hook_v`` at one head index for plain K/V-head patches. The tiny models
use grouped-query attention (4 query heads, 2 key/value heads).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from piggyback_interp.analysis.heads import head_sweep, kv_head_sweep
from piggyback_interp.analysis.kv_sweep import kv_layer_sweep
from piggyback_interp.analysis.sweep import sweep
from piggyback_interp.core.errors import UserError
from piggyback_interp.core.hooks import resolve_site
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import batch_spans, chat_spans
from piggyback_interp.measures.metrics import LogOdds, metric_on_model
from piggyback_interp.testing import equal_length_questions, tiny_model

QUESTIONS = ["Tell me a joke.", "Hi", "Can my landlord keep my deposit?"]
METRIC = LogOdds("I have no idea", "Paris")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def pair(request):
    return tiny_model(request.param, n_layers=3, seed=0), tiny_model(
        request.param, n_layers=3, seed=1
    )


def transplant(ft, base, question, edit, upto=None) -> float:
    """METRIC of ``ft`` over its own cache of the first ``upto`` positions (default: the
    prefix) after ``edit(own, base_cache)``; the positions after them run over it."""
    tok = chat_tokenizer(ft)
    spans = chat_spans(tok, question)
    ids, P = list(spans.input_ids), upto or len(spans.prefix)
    logits = []
    with torch.no_grad():
        for cont, n_read in zip(METRIC.continuations(tok), METRIC.n_read(tok), strict=True):
            full = torch.tensor([ids + list(cont)])
            own = ft.original_model(full[:, :P], use_cache=True).past_key_values
            src = base.original_model(full[:, :P], use_cache=True).past_key_values
            edit(own, src)
            out = ft.original_model(full[:, P:], past_key_values=own).logits
            read = len(ids) - 1 - P
            logits.append(out[:, read : read + n_read])
    return METRIC(logits).item()


def swap(layers, sites, heads=slice(None), positions=slice(None)):
    def edit(own, src):
        for layer in layers:
            for site in sites:
                attr = "keys" if site == "k" else "values"
                getattr(own.layers[layer], attr)[:, heads, positions] = getattr(
                    src.layers[layer], attr
                )[:, heads, positions]

    return edit


@pytest.mark.parametrize("site", ["kv", "k", "v", "z"])
def test_sweep_engine_equals_the_loop(pair, site):
    base, ft = pair
    tok = chat_tokenizer(ft)
    loop = sweep(ft, base, batch_spans(tok, QUESTIONS), METRIC, site=site, engine="loop",
                 progress=False)  # fmt: skip
    for align in ("left", "prefix"):
        fast = sweep(ft, base, batch_spans(tok, QUESTIONS, align=align), METRIC, site=site,
                     cells_per_batch=5, progress=False)  # fmt: skip
        assert fast.meta["engine"] == "batched" and loop.meta["engine"] == "reference loop"
        assert (fast.values - loop.values).abs().max() <= 1e-5
        assert (fast.clean - loop.clean).abs().max() <= 1e-5
        assert (fast.source - loop.source).abs().max() <= 1e-5
    assert (loop.values - loop.clean[:, None, None]).abs().max() > 1e-3  # patches do something


def test_sweep_kv_equals_a_cache_transplant_per_position(pair):
    base, ft = pair
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS[:2], align="prefix")
    fast = sweep(ft, base, batch, METRIC, site="kv", progress=False)
    for i, question in enumerate(QUESTIONS[:2]):
        for li in range(3):
            for p in range(fast.values.shape[2]):
                # the cache ends at p: later prefix positions read the patched entry
                edit = swap([li], "kv", positions=[p])
                expected = transplant(ft, base, question, edit, upto=p + 1)
                assert fast.values[i, li, p].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(("site", "window"), [("kv", 1), ("kv", 2), ("k", 1), ("v", 3)])
def test_kv_layer_sweep_engine_equals_loop_and_cache_transplant(pair, site, window):
    base, ft = pair
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS, align="prefix")
    fast = kv_layer_sweep(ft, base, batch, METRIC, site=site, window=window,
                          windows_per_batch=2, progress=False)  # fmt: skip
    loop = kv_layer_sweep(ft, base, batch, METRIC, site=site, window=window, engine="loop",
                          progress=False)  # fmt: skip
    assert (fast.values - loop.values).abs().max() <= 1e-5
    assert (fast.clean - loop.clean).abs().max() <= 1e-5
    assert (fast.source - loop.source).abs().max() <= 1e-5
    sites = "kv" if site == "kv" else site
    for i, question in enumerate(QUESTIONS):
        for j, start in enumerate(fast.layers):
            expected = transplant(ft, base, question, swap(range(start, start + window), sites))
            assert fast.values[i, j, 0].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("site", ["kv", "k", "v"])
def test_kv_head_sweep_isolated_equals_loop_and_cache_transplant(pair, site):
    base, ft = pair
    assert ft.cfg.n_key_value_heads < ft.cfg.n_heads  # grouped-query attention
    tok = chat_tokenizer(ft)
    fast = kv_head_sweep(ft, base, batch_spans(tok, QUESTIONS, align="prefix"), METRIC,
                         site=site, cells_per_batch=3, progress=False)  # fmt: skip
    loop = kv_head_sweep(ft, base, batch_spans(tok, QUESTIONS), METRIC, site=site,
                         engine="loop", progress=False)  # fmt: skip
    assert fast.values.shape == (3, 3, ft.cfg.n_key_value_heads)
    assert fast.tokens == ["KV0", "KV1"]
    assert (fast.values - loop.values).abs().max() <= 1e-5
    for i, question in enumerate(QUESTIONS):
        for layer in range(3):
            for head in range(ft.cfg.n_key_value_heads):
                expected = transplant(ft, base, question, swap([layer], site, heads=[head]))
                assert fast.values[i, layer, head].item() == pytest.approx(expected, abs=1e-5)
    assert (fast.values - fast.clean[:, None, None]).abs().max() > 1e-4


@pytest.mark.parametrize("segment", ["prefix", "postfix"])
def test_kv_head_sweep_hooked_equals_transformer_lens_style_hooks(pair, segment):
    """isolate=False: hooks on hook_k/hook_v at the head index, nothing pinned."""
    base, ft = pair
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS)
    fast = kv_head_sweep(ft, base, batch, METRIC, segment=segment, isolate=False,
                         cells_per_batch=3, progress=False)  # fmt: skip
    loop = kv_head_sweep(ft, base, batch, METRIC, segment=segment, isolate=False,
                         engine="loop", progress=False)  # fmt: skip
    assert (fast.values - loop.values).abs().max() <= 1e-5
    if segment == "postfix":
        return  # the source's postfix comes from the empty-query prompt (see patch_prefix)
    _, cache = base.run_with_cache(
        batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    )
    rows = [list(s.prefix) for s in batch.spans]
    for layer in range(3):
        for head in range(ft.cfg.n_key_value_heads):
            hooks = []
            for s in ("k", "v"):
                hs = resolve_site(ft, s)
                src = cache[hs.name(layer)]

                def hook(act, hook, hs=hs, src=src, head=head):
                    act = act.clone()
                    for row, pos in enumerate(rows):
                        if hs.pos_dim == 1:  # [batch, pos, head, d]
                            act[row, pos, head] = src[row, pos, head]
                        else:  # [batch, head, pos, d] (after a key norm)
                            act[row, head, pos] = src[row, head, pos]
                    return act

                hooks.append((hs.name(layer), hook))
            with torch.no_grad():
                expected = metric_on_model(ft, batch, METRIC, fwd_hooks=hooks)
            assert torch.allclose(fast.values[:, layer, head], expected, atol=1e-5)


@pytest.mark.parametrize("segment", ["prefix", "postfix", "query"])
def test_head_sweep_engine_equals_loop(pair, segment):
    base, ft = pair
    tok = chat_tokenizer(ft)
    candidates = ["Tell me a joke.", "I feel bored.", "Hi there", "How do I make friends?"]
    questions = equal_length_questions(tok, candidates, 2)  # equally long queries
    left = batch_spans(tok, questions)
    loop = head_sweep(ft, base, left, METRIC, segment=segment, engine="loop", progress=False)
    for batch in (left, batch_spans(tok, questions, align="prefix")):
        fast = head_sweep(ft, base, batch, METRIC, segment=segment, cells_per_batch=3,
                          progress=False)  # fmt: skip
        assert (fast.values - loop.values).abs().max() <= 1e-5


def test_clear_errors(pair):
    base, ft = pair
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS)
    engines = r"^engine must be one of batched, loop, got 'fast'$"
    with pytest.raises(UserError, match=engines):
        sweep(ft, base, batch, METRIC, site="kv", engine="fast", progress=False)
    with pytest.raises(UserError, match=engines):
        kv_head_sweep(ft, base, batch, METRIC, engine="fast", progress=False)
    with pytest.raises(UserError, match=engines):
        head_sweep(ft, base, batch, METRIC, engine="fast", progress=False)
    with pytest.raises(UserError, match=engines):
        kv_layer_sweep(ft, base, batch, METRIC, engine="fast", progress=False)
    with pytest.raises(UserError, match=r"^method must be one of exact, atp, got 'guess'$"):
        sweep(ft, base, batch, METRIC, site="kv", method="guess", progress=False)
    with pytest.raises(ValueError, match=r"key/value head\(s\) \[2\] out of range"):
        kv_head_sweep(ft, base, batch, METRIC, heads=[2], progress=False)
    with pytest.raises(ValueError, match="not 'z'"):
        kv_head_sweep(ft, base, batch, METRIC, site="z", progress=False)


@pytest.mark.parametrize("script", ["bench_kv_sweep.py", "bench_head_sweep.py"])
def test_benchmark_smoke(script):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"loop_s", "batched_s", "speedup", "max_abs_diff"} <= set(out)
    assert out["max_abs_diff"] <= 1e-5
