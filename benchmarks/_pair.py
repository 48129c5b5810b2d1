"""The pair and prompts of the K/V and head sweep benchmarks.

The "finetuned" model is the embedded SmolLM2-135M-Instruct with a seeded 2% weight
perturbation of every projection (``bench_sweep.perturbed_copy``); the source is the
unperturbed model. ``tiny=True`` uses two random tiny Llama models instead (for the
smoke tests). Prompts are equally long (no padding), so the loops (left-padded) and the
engines (prefix-aligned) see the same inputs.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch


def parse_args(doc: str, default_layers: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny random models (smoke test)")
    parser.add_argument(
        "--layers", type=int, default=default_layers, help="sweep N evenly spaced layers"
    )
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--cells-per-batch", type=int, default=8)
    return parser.parse_args()


def load(args: argparse.Namespace) -> dict[str, Any]:
    from _prompts import QUESTIONS
    from bench_sweep import perturbed_copy

    from piggyback_interp.core.models import chat_tokenizer, load_model
    from piggyback_interp.core.spans import batch_spans
    from piggyback_interp.measures.metrics import TargetLogProb
    from piggyback_interp.testing import equal_length_questions, tiny_model

    if args.tiny:
        base, ft = tiny_model("llama", n_layers=3, seed=0), tiny_model("llama", n_layers=3, seed=1)
        questions = ["Tell me a joke.", "I feel bored.", "Hi there", "How do I make friends?"]
        args.prompts = min(args.prompts, 2)
        metric = TargetLogProb("I have no idea")
    else:
        base = load_model(args.model, device=args.device)
        ft = perturbed_copy(base)
        questions = QUESTIONS
        metric = TargetLogProb("I have no idea about your question")
    tok = chat_tokenizer(ft)
    questions = equal_length_questions(tok, questions, args.prompts)
    return {
        "base": base,
        "ft": ft,
        "left": batch_spans(tok, questions, align="left"),
        "prefix": batch_spans(tok, questions, align="prefix"),
        "metric": metric,
        "layers": _spaced(min(args.layers, ft.cfg.n_layers), ft.cfg.n_layers),
    }


def _spaced(n: int, n_layers: int) -> list[int]:
    """``n`` evenly spaced layers, the midpoints of ``n`` equal bands (their mean depth is a
    full sweep's: later layers are cheaper to patch, as they leave fewer to run)."""
    return sorted({int((i + 0.5) * n_layers / n) for i in range(n)})


def timed(fn) -> tuple[Any, float]:
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    return out, time.perf_counter() - start


def side_by_side(batched, loop) -> dict[str, Any]:
    """Time ``batched()`` then ``loop()`` (each returns a SweepResult) in this process."""
    fast, fast_s = timed(batched)
    slow, loop_s = timed(loop)
    return {
        "loop_s": loop_s,
        "batched_s": fast_s,
        "max_abs_diff": (fast.values - slow.values).abs().max().item(),
        "cells": int(fast.values[0].numel()),
    }


def report(args: argparse.Namespace, parts: dict[str, dict[str, Any]], setup: dict) -> dict:
    """Totals over ``parts`` ({name: {loop_s, batched_s, max_abs_diff, cells}})."""
    loop_s = sum(p["loop_s"] for p in parts.values())
    batched_s = sum(p["batched_s"] for p in parts.values())
    for p in parts.values():
        p["speedup"] = round(p["loop_s"] / p["batched_s"], 2)
        p["loop_s"], p["batched_s"] = round(p["loop_s"], 2), round(p["batched_s"], 2)
    ft = setup["ft"]
    return {
        "loop_s": round(loop_s, 2),
        "batched_s": round(batched_s, 2),
        "speedup": round(loop_s / batched_s, 2),
        "max_abs_diff": max(p["max_abs_diff"] for p in parts.values()),
        "parts": parts,
        "model": "tiny-llama" if args.tiny else args.model,
        "layers": setup["layers"],
        "n_heads": ft.cfg.n_heads,
        "n_kv_heads": ft.cfg.n_key_value_heads,
        "prompts": len(setup["left"]),
        "tokens_per_prompt": int(setup["left"].input_ids.shape[1]),
        "cells_per_batch": args.cells_per_batch,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
    }
