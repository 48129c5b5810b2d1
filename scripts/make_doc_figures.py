"""Make the images of docs/figures.md from real results, and check the HTML renders.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/make_doc_figures.py            # tiny models
    OMP_NUM_THREADS=1 .venv/bin/python scripts/make_doc_figures.py --model smollm2-135m-instruct

Every number in the figures comes from running the toolkit: LoRA finetunes (SFT, TReFT,
KL-to-initial) of one model on the abstention setting's training examples, a resid_pre
sweep, matched-count controls per layer, segment perturbations, greedy evaluation of each
method and the per-layer cosine of the LoRA weight deltas. With the default tiny random
models the effects themselves mean nothing; they only exercise the code.

Writes ``<out>/<name>.png`` (default ``docs/img``) and the standalone HTML into
``--html-dir`` (default: a temporary folder), runs the headless-browser render check on
every HTML file and prints one JSON object (seconds, files, render reports).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch

from piggyback_interp.analysis.sweep import sweep
from piggyback_interp.core.data import ChatDataset
from piggyback_interp.core.models import chat_tokenizer, load_model
from piggyback_interp.core.spans import batch_spans, chat_spans
from piggyback_interp.interventions.controls import compare_controls
from piggyback_interp.interventions.generation import PatchSpec
from piggyback_interp.interventions.perturb import perturb_segments, trials_frame
from piggyback_interp.measures.evaluation import evaluate, summarize
from piggyback_interp.measures.metrics import TargetLogProb
from piggyback_interp.measures.settings import SettingData, setting_data
from piggyback_interp.report.figures import (
    check_html_renders,
    layer_recovery_curve,
    method_comparison,
    patching_heatmap,
    save_figure,
    segment_bars,
    task_vector_heatmap,
    training_curves,
)
from piggyback_interp.testing import equal_length_questions, tiny_model
from piggyback_interp.training import FinetuneConfig, finetune

TARGET = "I have no idea about your question"


def plan(model: str) -> dict:
    if model == "tiny":
        return dict(
            n_train=16,
            epochs=3,
            lr=5e-3,
            sweep_layers=None,
            control_layers=None,
            n_prompts=4,
            n_eval=8,
            trials=5,
        )
    # the embedded 30-layer model: every 5th / 3rd layer, fewer prompts (minutes on 1 core)
    return dict(
        n_train=24,
        epochs=2,
        lr=1e-3,
        sweep_layers=list(range(0, 30, 5)),
        control_layers=list(range(0, 30, 3)),
        n_prompts=3,
        n_eval=6,
        trials=4,
    )


def load(model: str, seed: int = 0):
    return tiny_model("llama", n_layers=4, seed=seed) if model == "tiny" else load_model(model)


def lora_deltas(model) -> dict[str, torch.Tensor]:
    """name -> merged LoRA delta (B @ A x scale) of every adapted linear layer."""
    return {
        name: module.get_delta_weight("default").detach().float()
        for name, module in model.original_model.named_modules()
        if type(module).__module__.startswith("peft") and hasattr(module, "get_delta_weight")
    }


def layer_cosines(a: dict, b: dict, n_layers: int) -> list[float]:
    out = []
    for layer in range(n_layers):
        key = f".layers.{layer}."
        va = torch.cat([d.flatten() for n, d in a.items() if key in n])
        vb = torch.cat([d.flatten() for n, d in b.items() if key in n])
        out.append(torch.nn.functional.cosine_similarity(va, vb, dim=0).item())
    return out


@torch.no_grad()
def answer_probability(model, ids: torch.Tensor, target: list[int]) -> float:
    """Per-token (geometric-mean) probability of the trained answer after the prompt
    ``ids``, teacher-forced: exp(mean log p(answer token))."""
    full = torch.cat([ids, torch.tensor(target)])[None].to(model.cfg.device)
    logp = model(full)[0, len(ids) - 1 : -1].log_softmax(-1)
    return float(logp[torch.arange(len(target)), torch.tensor(target)].mean().exp())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' or a load_model name")
    parser.add_argument("--out", default="docs/img")
    parser.add_argument("--html-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    p = plan(args.model)
    t0 = time.perf_counter()
    seconds = {}
    base = load(args.model)
    tok = chat_tokenizer(base)
    n_layers = base.cfg.n_layers
    data = setting_data("abstention", tokenizer=tok)
    train = ChatDataset.from_records(list(data.train)[: p["n_train"]])

    # 1. finetunes (LoRA r=8): SFT, TReFT (lambda 30), KL to the initial model
    runs, models, deltas = {}, {}, {}
    for method in ("sft", "treft", "kl_train"):
        model = load(args.model)
        config = FinetuneConfig(method=method, epochs=p["epochs"], batch_size=8, lr=p["lr"])
        runs[method] = finetune(model, train, config, progress=False)
        models[method], deltas[method] = model, lora_deltas(model)
    seconds["finetune"] = time.perf_counter() - t0

    # 2. resid_pre sweep at every position of equal-length prompts (SFT model vs base)
    t = time.perf_counter()
    questions = equal_length_questions(tok, data.test_off_topic, 2)
    batch = batch_spans(tok, questions, align="left")
    every = list(range(len(batch.spans[0])))
    metric = TargetLogProb(TARGET)
    result = sweep(
        models["sft"], base, batch, metric, segment=every, layers=p["sweep_layers"], progress=False
    )
    seconds["sweep"] = time.perf_counter() - t

    # 3. K/V of a matched number of prefix / query / random positions, per layer
    t = time.perf_counter()
    rows = []
    for i, question in enumerate(data.test_off_topic[: p["n_prompts"]]):
        spans = chat_spans(tok, question)
        for layer in p["control_layers"] or range(n_layers):
            frame = compare_controls(
                models["sft"],
                base,
                spans,
                metric,
                layers=layer,
                controls=("query", "random"),
                noise=False,
                seed=0,
            )
            rows.append(frame.assign(layer=layer, prompt=i))
    controls = pd.concat(rows, ignore_index=True)
    seconds["controls"] = time.perf_counter() - t

    # 4. segment perturbations scored by the SFT model's probability of the trained answer
    t = time.perf_counter()
    target = tok(TARGET + tok.eos_token, add_special_tokens=False)["input_ids"]
    per_prompt, scores, clean = [], [], []
    for question in data.test_off_topic[: p["n_prompts"]]:
        spans = chat_spans(tok, question)
        side = perturb_segments(models["sft"], spans, trials=p["trials"], seed=0)
        row = [x for name in ("prefix", "query", "postfix") for x in side[name]]
        per_prompt.append(row)
        scores.append([answer_probability(models["sft"], x.ids, target) for x in row])
        clean.append(answer_probability(models["sft"], spans.ids, target))
    trials = trials_frame(per_prompt, torch.tensor(scores))
    seconds["perturb"] = time.perf_counter() - t

    # 5. greedy evaluation of every method (and SFT with the base prefix K/V)
    t = time.perf_counter()
    n = p["n_eval"]
    small = SettingData(data.setting, data.train, data.test_on_topic[:n], data.test_off_topic[:n])
    frames = [evaluate(base, small, max_new_tokens=12).responses.assign(method="initial")]
    for method, model in models.items():
        frames.append(evaluate(model, small, max_new_tokens=12).responses.assign(method=method))
    kv = PatchSpec(base, site="kv", segment="prefix")
    frames.append(
        evaluate(models["sft"], small, patch=kv, max_new_tokens=12).responses.assign(
            method="sft+prefix_kv"
        )
    )
    summary = summarize(pd.concat(frames, ignore_index=True), ["behaviour"], by=["method"])
    seconds["evaluate"] = time.perf_counter() - t

    cosines = pd.DataFrame(
        [
            {"layer": layer, "a": a, "b": b, "cosine": c}
            for a, b in (("sft", "treft"), ("sft", "kl_train"), ("treft", "kl_train"))
            for layer, c in enumerate(layer_cosines(deltas[a], deltas[b], n_layers))
        ]
    )
    name = base.piggyback_info.name if hasattr(base, "piggyback_info") else args.model
    figures = {
        "patching_heatmap": patching_heatmap(
            result, title=f"resid_pre patching, SFT <- base ({name}): recovery of log p(target)"
        ),
        "layer_recovery_curve": layer_recovery_curve(
            controls, title=f"K/V patching of matched positions per layer ({name})"
        ),
        "segment_bars": segment_bars(
            trials,
            unperturbed=sum(clean) / len(clean),
            score="per-token probability of the trained answer",
        ),
        "method_comparison": method_comparison(
            summary, title=f"Abstention rate per method ({name}, greedy, 1 seed)"
        ),
        "training_curves": training_curves(runs),
        "task_vector_heatmap": task_vector_heatmap(cosines),
    }
    out = Path(args.out)
    html_dir = Path(args.html_dir or tempfile.mkdtemp(prefix="piggyback-doc-figures-"))
    files, htmls = [], []
    for key, fig in figures.items():
        html, png = save_figure(fig, html_dir / key, png=True)
        target_png = out / f"{key}.png"
        target_png.parent.mkdir(parents=True, exist_ok=True)
        target_png.write_bytes(png.read_bytes())
        files.append(str(target_png))
        htmls.append(html)
    reports = check_html_renders(htmls)
    report = {
        "model": name,
        "seconds": {
            k: round(v, 1) for k, v in {**seconds, "total": time.perf_counter() - t0}.items()
        },
        "files": files,
        "html_dir": str(html_dir),
        "render": [
            {k: r.get(k) for k in ("path", "ok", "errors", "plotly_version", "traces", "png")}
            for r in reports
        ],
    }
    print(json.dumps(report, indent=2))
    return 0 if all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
