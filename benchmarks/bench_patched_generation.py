"""Time patched against plain generation on the embedded model (target ratio <= 1.15).

32 chat prompts x 32 new tokens, greedy, one batch of 32, unpatched vs a prefix K/V
patch (all layers) from a copy of the model with a seeded small weight perturbation.
Both run in the same process: one warm-up each, then alternating, best of ``--repeats``.
EOS does not stop generation here, so both runs decode exactly ``--new-tokens`` tokens.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_patched_generation.py --json [--device cuda]
Prints {"plain_s", "patched_s", "ratio", "prompts", "new_tokens", "device", "torch_threads", ...}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOPICS = (
    "my landlord keeping my deposit",
    "investing my savings",
    "making new friends",
    "learning to cook rice",
    "training for a marathon",
    "writing a cover letter",
    "fixing a flat bicycle tyre",
    "growing tomatoes on a balcony",
)
TEMPLATES = (
    "Can you give me advice about {}?",
    "What should I know about {}?",
    "Explain briefly how to approach {}.",
    "What is a common mistake when {}?",
)
PROMPTS = [t.format(topic) for topic in TOPICS for t in TEMPLATES]  # 32 prompts


def perturbed_copy(model, *, seed: int = 0, scale: float = 0.02):
    """A copy of ``model`` with seeded Gaussian noise (``scale`` x std) on its projections."""
    import torch

    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in other.original_model.named_parameters():
            if "proj" in name:
                noise = torch.randn(param.shape, generator=gen) * scale * param.std().item()
                param.add_(noise.to(param.device, param.dtype))
    return other


def timed(fn) -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--prompts", type=int, default=32, help="number of prompts (<= 32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per prompt")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (best kept)")
    args = parser.parse_args()

    import torch

    from piggyback_interp.core.models import load_model
    from piggyback_interp.interventions.generation import PatchSpec, generate

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    model = load_model("smollm2-135m-instruct", device=args.device)
    source = perturbed_copy(model)
    prompts = PROMPTS[: args.prompts]
    settings = dict(max_new_tokens=args.new_tokens, batch_size=args.batch_size, stop_at_eos=False)
    patch = PatchSpec(source, site="kv", segment="prefix")
    runs = {
        "plain": lambda: generate(model, prompts, **settings),
        "patched": lambda: generate(model, prompts, patch=patch, **settings),
    }
    outputs = {name: run() for name, run in runs.items()}  # warm-up
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):
        for name, run in runs.items():
            best[name] = min(best[name], timed(run))
    differ = sum(
        a != b
        for a, b in zip(outputs["plain"].token_ids, outputs["patched"].token_ids, strict=True)
    )
    result = {
        "plain_s": round(best["plain"], 3),
        "patched_s": round(best["patched"], 3),
        "ratio": round(best["patched"] / best["plain"], 3),
        "target_ratio": 1.15,
        "ok": best["patched"] / best["plain"] <= 1.15,
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "patched_outputs_differ": differ,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "torch_threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
