"""Attribution patching (AtP) against exact patching: speed and agreement.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_atp.py --json [--layers N] [--device cuda]
       python benchmarks/bench_atp.py --tiny --json      (smoke test: tiny random pair)
Target (issue 17): speedup >= 20; the agreement is reported as measured.

The pair is the embedded SmolLM2-135M-Instruct and a real narrow finetune of it: a
LoRA SFT on the abstention setting's training set (lr 6e-4, 1 epoch, batch 16),
trained on the first run and cached under runs/bench_atp/ (``--retrain`` redoes it).
Prompts: 4 held-out on-topic questions, prefix-aligned. Site: resid_pre at every
prefix position of every layer. For each metric, the exact sweep (sweep(), the fast
engine) and the AtP sweep run side by side; agreement compares the prompt-mean
effect (patched - finetuned) per (layer, position) cell: Spearman's rank correlation
over all cells, and the share of the exact top 10 cells (by |effect|) that are in
AtP's top 10. The top-level numbers are for the first metric, the abstention
target's log-probability, which is saturated on the finetuned model (p ~ 1); log-odds
and next-token KL follow under "metrics".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

TARGET = "I have no idea about your question"
CACHE = Path(__file__).resolve().parents[1] / "runs" / "bench_atp"


def finetuned_pair(args):
    """(base, finetuned): the embedded model and its abstention LoRA finetune (cached)."""
    from piggyback_interp.core.models import load_model
    from piggyback_interp.measures.settings import setting_data
    from piggyback_interp.training import FinetuneConfig, finetune

    dtype = getattr(torch, args.dtype)
    base = load_model(args.model, device=args.device, dtype=dtype)
    adapter = CACHE / "adapter"
    train_s = None
    if args.retrain or not (adapter / "adapter_config.json").is_file():
        model = load_model(args.model, device=args.device, dtype=dtype)
        config = FinetuneConfig(lr=6e-4, epochs=1, batch_size=16, export="adapter")
        start = time.perf_counter()
        finetune(model, setting_data("abstention").train, config, out_dir=CACHE, progress=False)
        train_s = time.perf_counter() - start
        del model
    ft = load_model(str(adapter), device=args.device, dtype=dtype, base=args.model)
    return base, ft, train_s


def tiny_pair():
    """A tiny random llama and a copy with 5% weight noise (the first-order regime)."""
    from bench_sweep import perturbed_copy

    from piggyback_interp.testing import tiny_model

    base = tiny_model("llama", n_layers=2, seed=0)
    return base, perturbed_copy(base, scale=0.05), None


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def top_recall(exact: torch.Tensor, est: torch.Tensor, k: int = 10) -> float:
    k = min(k, exact.numel())
    want = set(exact.abs().argsort(descending=True)[:k].tolist())
    got = set(est.abs().argsort(descending=True)[:k].tolist())
    return len(want & got) / k


def compare(ft, base, batch, metric, layers, cells_per_batch) -> dict:
    from piggyback_interp.analysis.sweep import sweep

    start = time.perf_counter()
    exact = sweep(
        ft, base, batch, metric, layers=layers, cells_per_batch=cells_per_batch, progress=False
    )
    exact_s = time.perf_counter() - start
    start = time.perf_counter()
    est = sweep(ft, base, batch, metric, layers=layers, method="atp")
    atp_s = time.perf_counter() - start
    d_exact = (exact.values - exact.clean[:, None, None]).mean(0).flatten()
    d_est = (est.values - est.clean[:, None, None]).mean(0).flatten()
    return {
        "exact_s": round(exact_s, 2),
        "atp_s": round(atp_s, 2),
        "speedup": round(exact_s / atp_s, 1),
        "spearman": round(spearman(d_exact, d_est), 4),
        "top10_recall": top_recall(d_exact, d_est),
        "pearson": round(torch.corrcoef(torch.stack([d_exact, d_est]))[0, 1].item(), 4),
        "clean_mean": round(exact.clean.mean().item(), 4),
        "source_mean": round(exact.source.mean().item(), 4),
        "max_abs_effect": float(f"{d_exact.abs().max().item():.4g}"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="smoke test on a tiny random pair")
    parser.add_argument("--layers", type=int, default=None, help="sweep only the first N layers")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--cells-per-batch", type=int, default=8)
    parser.add_argument("--retrain", action="store_true", help="retrain the cached finetune")
    args = parser.parse_args()

    from _prompts import QUESTIONS

    from piggyback_interp.core.models import chat_tokenizer
    from piggyback_interp.core.spans import batch_spans
    from piggyback_interp.measures.metrics import (
        LogOdds,
        NextTokenKL,
        TargetLogProb,
        next_token_logprobs,
    )
    from piggyback_interp.measures.settings import setting_data

    base, ft, train_s = tiny_pair() if args.tiny else finetuned_pair(args)
    tok = chat_tokenizer(ft)
    questions = QUESTIONS if args.tiny else setting_data("abstention").test_on_topic
    questions = list(questions[: args.prompts])
    batch = batch_spans(tok, questions, align="prefix")
    reference = next_token_logprobs(base, batch_spans(tok, questions, align="left"))
    metrics = [
        TargetLogProb(TARGET),
        LogOdds(TARGET, "It depends on"),
        NextTokenKL(reference),
    ]
    layers = list(range(args.layers or ft.cfg.n_layers))
    per_metric = {
        m.name: compare(ft, base, batch, m, layers, args.cells_per_batch) for m in metrics
    }
    first = per_metric[metrics[0].name]
    out = {
        **{k: first[k] for k in ("exact_s", "atp_s", "speedup", "spearman", "top10_recall")},
        "metrics": per_metric,
        "model": "tiny-llama" if args.tiny else args.model,
        "finetune": "5% weight noise" if args.tiny else "abstention LoRA SFT (runs/bench_atp)",
        "train_s": None if train_s is None else round(train_s, 1),
        "site": "resid_pre",
        "prompts": len(questions),
        "layers": len(layers),
        "cells": len(layers) * len(batch.spans[0].prefix),
        "device": args.device,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
