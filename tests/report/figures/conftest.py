"""Shared fixtures of the figure tests: real results of tiny models (sweeps, finetunes)."""

import plotly.io as pio

RENDERER, TEMPLATE = pio.renderers.default, pio.templates.default  # before importing figures

import pytest  # noqa: E402

from piggyback_interp.analysis.kv_sweep import kv_layer_sweep  # noqa: E402
from piggyback_interp.analysis.sweep import sweep  # noqa: E402
from piggyback_interp.core.data import ChatDataset  # noqa: E402
from piggyback_interp.core.models import chat_tokenizer  # noqa: E402
from piggyback_interp.core.spans import batch_spans  # noqa: E402
from piggyback_interp.measures.metrics import LogOdds  # noqa: E402
from piggyback_interp.report.figures import (  # noqa: E402
    layer_recovery_curve,
    patching_heatmap,
    segment_bars,
    training_curves,
)
from piggyback_interp.testing import equal_length_questions, tiny_model  # noqa: E402
from piggyback_interp.training import FinetuneConfig, finetune  # noqa: E402

CANDIDATES = [
    "Tell me a joke.",
    "Can my landlord keep my deposit?",
    "How do I make friends?",
    "Is a verbal contract binding?",
    "What is the capital of France?",
]
METRIC = LogOdds("I have no idea", "Paris")
N_LAYERS = 3


@pytest.fixture(scope="session")
def plotly_defaults():
    """plotly's default renderer and template as they were before the figures were imported."""
    return RENDERER, TEMPLATE


@pytest.fixture(scope="session")
def n_layers():
    return N_LAYERS


@pytest.fixture(scope="session")
def candidates():
    return CANDIDATES


@pytest.fixture(scope="session")
def metric():
    return METRIC


@pytest.fixture(scope="session")
def pair():
    return tiny_model("llama", n_layers=N_LAYERS, seed=0), tiny_model(
        "llama", n_layers=N_LAYERS, seed=1
    )


@pytest.fixture(scope="session")
def questions(pair):
    return equal_length_questions(chat_tokenizer(pair[1]), CANDIDATES, 2)


@pytest.fixture(scope="session")
def sweep_result(pair, questions):
    """resid_pre patched at every position (prefix, query and postfix) of two prompts."""
    base, ft = pair
    batch = batch_spans(chat_tokenizer(ft), questions, align="left")
    every = list(range(len(batch.spans[0])))
    return sweep(ft, base, batch, METRIC, segment=every, progress=False), batch


@pytest.fixture(scope="session")
def kv_result(pair):
    base, ft = pair
    batch = batch_spans(chat_tokenizer(ft), CANDIDATES[:3], align="prefix")
    return kv_layer_sweep(ft, base, batch, METRIC, progress=False)


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory):
    """Three real full finetunes of the same tiny model (4 steps each); TReFT's folder
    keeps finetune.json."""
    records = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [(q, "I have no idea about your question") for q in CANDIDATES[:4]] * 2
    ]
    data = ChatDataset.from_records(records)
    initial = {
        n: p.detach().clone()
        for n, p in tiny_model("llama", n_layers=N_LAYERS).original_model.named_parameters()
    }
    out = {}
    for method in ("sft", "treft", "kl_train"):
        model = tiny_model("llama", n_layers=N_LAYERS, seed=0)
        config = FinetuneConfig(
            method=method, lora_rank=None, lr=3e-3, epochs=2, batch_size=4, export="none"
        )
        folder = tmp_path_factory.mktemp(method)
        result = finetune(model, data, config, out_dir=folder, progress=False)
        deltas = {
            n: p.detach() - initial[n]
            for n, p in model.original_model.named_parameters()
            if n in initial
        }
        out[method] = (result, folder, deltas, model)
    return out


@pytest.fixture
def all_figures(sweep_result, kv_result, finetuned):
    """One figure of each kind, built from the real results."""
    return {
        "heatmap": patching_heatmap(sweep_result[0]),
        "curve": layer_recovery_curve({"prefix": kv_result}),
        "bars": segment_bars(
            {"prefix": {"best": 0.9, "avg": 0.7}, "query": {"best": 0.6, "avg": 0.4}}
        ),
        "training": training_curves(finetuned["treft"][0]),
    }
