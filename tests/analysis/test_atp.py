"""Attribution patching: the gradient x difference by hand, first-order agreement with
exact patching, the same result layout as sweep(), and the pre-screen."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from piggyback_interp.analysis.atp import atp_prescreen, atp_sweep
from piggyback_interp.analysis.reference import reference_sweep
from piggyback_interp.analysis.sweep import sweep
from piggyback_interp.core.hooks import KV_SITES, resolve_site
from piggyback_interp.core.models import chat_tokenizer
from piggyback_interp.core.spans import batch_spans
from piggyback_interp.interventions import capture, segment_positions
from piggyback_interp.interventions.activations import scatter
from piggyback_interp.measures.metrics import LogOdds, NextTokenKL, continuation_inputs
from piggyback_interp.testing import tiny_model

QUESTIONS = ["Tell me a joke.", "Hi", "Can my landlord keep my deposit?"]
METRIC = LogOdds("I have no idea", "Paris")


def _near_copy(model, scale: float, seed: int = 1):
    """``model`` with seeded Gaussian noise of ``scale`` on every weight."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in out.original_model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale)
    return out


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def near_pair(request):
    """(base, finetuned) with the finetuned a small perturbation of the base."""
    base = tiny_model(request.param, n_layers=2, seed=0)
    return base, _near_copy(base, 3e-4)


def _by_hand(model, source, batch, metric, site, layer, cell, isolate):
    """grad . (source - clean) for ONE cell: a leaf holding the target's own activation
    is written at the cell (and, for isolated K/V, the cell position's keys/values at
    every layer are pinned to constants), and torch.autograd differentiates the metric."""
    hs = resolve_site(model, site)
    isolate = isolate and site in KV_SITES
    positions = segment_positions(batch, "prefix")[:, cell : cell + 1]
    src = capture(source, batch, "prefix", site=site, layers=layer).values[hs.name(layer)]
    clean = capture(model, batch, "prefix", site=KV_SITES if isolate else site, layers=None)
    leaf = clean.values[hs.name(layer)][:, cell : cell + 1].clone().requires_grad_(True)
    hooks = []
    if isolate:  # constants: no gradient flows into them
        for name, val in clean.values.items():
            if name != hs.name(layer):
                pin_site = resolve_site(model, "k" if ".hook_k" in name else "v")
                hooks.append((name, _writer(pin_site, positions, val[:, cell : cell + 1])))
    hooks.append((hs.name(layer), _writer(hs, positions, leaf)))
    tok = chat_tokenizer(model)
    logits = []
    for cont, n in zip(metric.continuations(tok), metric.n_read(tok), strict=True):
        ids, mask, pos = continuation_inputs(batch, cont, "cpu")
        with model.hooks(fwd_hooks=hooks):
            out = model(ids, attention_mask=mask, position_ids=pos)
        start = ids.shape[1] - len(cont) - 1
        logits.append(out[:, start : start + n])
    (grad,) = torch.autograd.grad(metric(logits).sum(), leaf)
    return (grad * (src[:, cell : cell + 1] - leaf.detach())).flatten(1).sum(-1)


def _writer(hs, positions, values):
    def hook(act, hook):
        return scatter(act, hs, positions, values)

    return hook


@pytest.mark.parametrize(
    ("arch", "site", "isolate"),
    [
        ("llama", "resid_pre", True),
        ("llama", "v", True),
        ("llama", "k", True),
        ("qwen3", "k", True),  # the key after its norm
        ("qwen2", "v", False),
        ("qwen2", "z", True),
    ],
)
def test_gradient_times_difference_equals_autograd_by_hand(arch, site, isolate):
    base, ft = tiny_model(arch, seed=0), tiny_model(arch, seed=1)
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS)
    layer, cell = 0, 2
    result = atp_sweep(ft, base, batch, METRIC, site=site, layers=[layer], isolate=isolate)
    estimate = result.values[:, 0, cell] - result.clean
    expected = _by_hand(ft, base, batch, METRIC, site, layer, cell, isolate)
    assert expected.abs().max() > 1e-4  # a real effect, not two zeros
    torch.testing.assert_close(estimate, expected.detach(), atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "mlp_out", "kv", "k", "v", "z"])
def test_first_order_regime_matches_exact_patching(near_pair, site):
    """finetuned = base + 3e-4 noise: AtP equals exact patching up to second order
    (and float32 rounding of the metric, ~4e-6 here)."""
    base, ft = near_pair
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS)
    est = atp_sweep(ft, base, batch, METRIC, site=site)
    exact = reference_sweep(ft, base, batch, METRIC, site=site)
    d_est = est.values - est.clean[:, None, None]
    d_exact = exact - est.clean[:, None, None]
    scale = d_exact.abs().max().item()
    assert scale > 2e-5  # the patches move the metric
    assert (d_est - d_exact).abs().max().item() <= 0.03 * scale + 5e-6
    if scale > 1e-4:  # well above rounding
        corr = torch.corrcoef(torch.stack([d_est.flatten(), d_exact.flatten()]))[0, 1]
        assert corr > 0.999


def test_isolated_kv_differs_from_plain_gradient(near_pair):
    """The isolated estimate leaves out the position's own attention row: it tracks the
    isolated exact patch, and the plain gradient tracks the unisolated one."""
    base, ft = near_pair
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS)
    for isolate in (True, False):
        est = atp_sweep(ft, base, batch, METRIC, site="v", isolate=isolate)
        exact = reference_sweep(ft, base, batch, METRIC, site="v", isolate=isolate)
        other = reference_sweep(ft, base, batch, METRIC, site="v", isolate=not isolate)
        err = (est.values - exact).abs().max()
        assert err < 0.1 * (est.values - other).abs().max()


def test_result_has_the_layout_of_sweep():
    base, ft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    tok = chat_tokenizer(ft)
    for align in ("left", "prefix"):
        batch = batch_spans(tok, QUESTIONS, align=align)
        exact = sweep(ft, base, batch, METRIC, layers=[1, 0], progress=False)
        est = sweep(ft, base, batch, METRIC, layers=[1, 0], method="atp")
        assert est.values.shape == exact.values.shape
        for field in ("layers", "positions", "tokens", "segments"):
            assert getattr(est, field) == getattr(exact, field)
        torch.testing.assert_close(est.clean, exact.clean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(est.source, exact.source, atol=1e-5, rtol=1e-5)
        assert est.meta["method"] == "atp" and est.meta["site"] == "resid_pre"
        assert est.to_frame().shape == exact.to_frame().shape


def test_next_token_kl_and_an_activations_source():
    base, ft = tiny_model("qwen2", seed=0), tiny_model("qwen2", seed=1)
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS)
    with torch.no_grad():
        ref = base(
            batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        )[:, -1]
    metric = NextTokenKL(ref.log_softmax(-1))
    from_model = atp_sweep(ft, base, batch, metric, site="kv", layers=[1])
    acts = capture(base, batch, "prefix", site="kv", layers=[1])
    from_acts = atp_sweep(ft, acts, batch, metric, site="kv", layers=[1])
    torch.testing.assert_close(from_model.values, from_acts.values)
    assert torch.allclose(from_model.source, torch.zeros(3), atol=1e-5)  # KL(base || base)
    assert from_acts.source.isnan().all()


def test_prescreen_patches_the_top_cells_exactly():
    base, ft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS)
    est = atp_sweep(ft, base, batch, METRIC, site="kv")
    exact = reference_sweep(ft, base, batch, METRIC, site="kv")
    screened = atp_prescreen(ft, base, batch, METRIC, site="kv", top_k=5)
    effect = (est.values - est.clean[:, None, None]).mean(0).abs()
    top = set(effect.flatten().argsort(descending=True)[:5].tolist())
    n_cells = effect.shape[1]
    for flat in range(effect.numel()):
        li, c = divmod(flat, n_cells)
        want = exact[:, li, c] if flat in top else est.values[:, li, c]
        torch.testing.assert_close(screened.values[:, li, c], want, atol=1e-5, rtol=1e-5)
    expected_cells = sorted([est.layers[f // n_cells], est.positions[f % n_cells]] for f in top)
    assert screened.meta["exact_cells"] == expected_cells
    assert screened.meta["method"] == "atp_prescreen"
    with pytest.raises(ValueError, match="align='left'"):
        prefix_aligned = batch_spans(chat_tokenizer(ft), QUESTIONS, align="prefix")
        atp_prescreen(ft, base, prefix_aligned, METRIC, site="kv")


@pytest.mark.parametrize(("family", "align"), [("llama", "left"), ("qwen2", "prefix")])
def test_prescreen_of_a_residual_site_runs_its_cells_on_the_engine(family, align):
    """The top cells of a residual site come from the engine (any alignment) and equal
    the reference loop's one-forward-per-cell values."""
    base, ft = tiny_model(family, seed=0), tiny_model(family, seed=1)
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS, align=align)
    screened = atp_prescreen(ft, base, batch, METRIC, site="resid_mid", top_k=11)
    if align == "left":
        exact = reference_sweep(ft, base, batch, METRIC, site="resid_mid")
    else:  # the loop needs left padding; the same prompts, the prefix at the same columns
        exact = reference_sweep(ft, base, batch_spans(chat_tokenizer(ft), QUESTIONS), METRIC,
                                site="resid_mid")  # fmt: skip
    assert len(screened.meta["exact_cells"]) == 11
    for layer, label in screened.meta["exact_cells"]:
        li, c = screened.layers.index(layer), screened.positions.index(label)
        torch.testing.assert_close(screened.values[:, li, c], exact[:, li, c],
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


def test_clear_errors():
    base, ft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    batch = batch_spans(chat_tokenizer(ft), QUESTIONS)
    with pytest.raises(ValueError, match="top_k"):
        atp_prescreen(ft, base, batch, METRIC, top_k=-1)


def test_benchmark_tiny_smoke():
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_atp.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--tiny", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("exact_s", "atp_s", "speedup", "spearman", "top10_recall"):
        assert key in out
    assert set(out["metrics"]) == {"target_logprob", "log_odds", "next_token_kl"}
    assert out["metrics"]["log_odds"]["pearson"] > 0.99  # a small perturbation: first order
    assert out["top10_recall"] >= 0.8
