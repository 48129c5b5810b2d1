"""Layer x prefix-position resid_pre sweep: this engine vs transformer_lens.patching.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_sweep.py --json [--layers N] [--device cuda]
Target (issue 3): speedup >= 4 on a 2-core CPU, max_abs_diff <= 1e-4.

The "finetuned" model is the embedded SmolLM2-135M-Instruct with a seeded 2% weight
perturbation of every projection; the source is the unperturbed model. Metric: mean
over 4 prompts of log p("I have no idea about your question") (teacher-forced).
Both tools see the same equal-length prompts (no padding) and patch the same cells.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def perturbed_copy(model, scale: float = 0.02, seed: int = 0):
    """The model with seeded Gaussian noise (scale x each weight's std) on every projection."""
    ft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in ft.original_model.named_parameters():
            if "proj" in name:
                noise = torch.randn(param.shape, generator=gen).to(param.device, param.dtype)
                param.add_(noise * scale * param.std())
    return ft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--layers", type=int, default=None, help="sweep only the first N layers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--cells-per-batch", type=int, default=8)
    args = parser.parse_args()

    import pandas as pd
    from _prompts import QUESTIONS
    from transformer_lens.patching import generic_activation_patch, layer_pos_patch_setter

    from piggyback_interp.analysis.sweep import sweep
    from piggyback_interp.core.models import chat_tokenizer, load_model
    from piggyback_interp.core.spans import batch_spans
    from piggyback_interp.measures.metrics import TargetLogProb, continuation_inputs
    from piggyback_interp.testing import equal_length_questions

    dtype = getattr(torch, args.dtype)
    base = load_model(args.model, device=args.device, dtype=dtype)
    ft = perturbed_copy(base)
    tok = chat_tokenizer(ft)
    # equal-length prompts: no padding, so TL (which passes no attention mask) sees the
    # same input; align="prefix" lets the engine run the shared prefix once per cell
    batch = batch_spans(tok, equal_length_questions(tok, QUESTIONS, 4), align="prefix")
    layers = list(range(args.layers or ft.cfg.n_layers))
    metric = TargetLogProb("I have no idea about your question")
    (cont,) = metric.continuations(tok)

    start = time.perf_counter()
    ours = sweep(
        ft, base, batch, metric, layers=layers, cells_per_batch=args.cells_per_batch, progress=False
    )
    ours_s = time.perf_counter() - start

    ids, _, _ = continuation_inputs(batch, cont, args.device)
    read0 = batch.input_ids.shape[1] - 1
    _, clean_cache = base.run_with_cache(ids)

    def tl_metric(logits):
        return metric([logits[:, read0 : read0 + len(cont)]]).mean()

    prefix = list(batch.spans[0].prefix)
    index_df = pd.DataFrame(
        [(layer, p) for layer in layers for p in prefix], columns=["layer", "pos"]
    )
    start = time.perf_counter()
    with torch.no_grad():
        # get_act_patch_resid_pre with an index_df restricting it to the prefix cells
        tl = generic_activation_patch(
            ft, ids, clean_cache, tl_metric, layer_pos_patch_setter, "resid_pre", index_df=index_df
        )
    tl_s = time.perf_counter() - start

    diff = (ours.mean().reshape(-1).cpu() - tl.reshape(-1).float().cpu()).abs().max().item()
    out = {
        "ours_s": round(ours_s, 2),
        "tl_s": round(tl_s, 2),
        "speedup": round(tl_s / ours_s, 2),
        "max_abs_diff": diff,
        "cells": len(index_df),
        "cells_per_batch": args.cells_per_batch,
        "prompts": len(batch),
        "tokens_per_prompt": int(ids.shape[1]),
        "device": args.device,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
