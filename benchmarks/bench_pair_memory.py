"""Memory of a base + LoRA pair: two copies of the weights against one shared copy.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_pair_memory.py --json [--tiny] [--out DIR]

Makes a LoRA adapter (rank 8 on every linear layer; ``lora_B`` random and small, so
the adapter really changes the model) on the embedded SmolLM2-135M-Instruct
(``--tiny``: rank 2 on a tiny random model, for the smoke test), saves it with the
toolkit's export, and loads the pair twice: ``load_pair(base, adapter, shared=False)``
(two copies, the adapter merged) and ``load_pair(base, adapter)`` (the default: one
copy, the adapter unmerged).

Prints {"two_copies_mb", "shared_mb", "ratio", "max_abs_diff", ...}. ``*_mb`` counts
every parameter and buffer of both models once per storage (tied and shared tensors
counted once). ``max_abs_diff`` is the largest logit difference (base and finetuned,
2 prompts) between the shared pair and the two-copy pair that runs the adapter the same
way (unmerged, ``shared=False, merge_adapter=False``); ``*_diff_vs_merged_pair``
compare with the default two-copy pair (adapter merged: equal up to rounding), and
``finetuned_logit_change`` says how much the adapter moves the logits. ``rss_*`` is
the resident memory each pair adds to a fresh process after one forward of each model;
on the CPU, safetensors weights are memory-mapped, so untouched tensors of two copies
of one file share page cache and RSS understates the two-copy cost (on a GPU every
copy is real device memory, as the storage count says).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PROMPTS = ["What is the capital of France?", "Tell me a joke."]


def _mb(*models) -> float:
    seen: dict[int, int] = {}
    for model in models:
        for t in [*model.parameters(), *model.buffers()]:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()) / 2**20


def make_adapter(out: Path, tiny: bool) -> tuple[str, Path]:
    """(base name or directory, adapter directory)."""
    from piggyback_interp.core.models import load_model
    from piggyback_interp.testing import save_tiny_model
    from piggyback_interp.training.export import save_finetuned
    from piggyback_interp.training.lora import apply_lora

    base = str(save_tiny_model(out / "base", n_layers=4)) if tiny else "smollm2-135m-instruct"
    model = load_model(base)
    torch.manual_seed(0)
    apply_lora(model, rank=2 if tiny else 8, init_lora_weights=False)
    with torch.no_grad():  # peft's random lora_B is large: keep the model sane
        for name, param in model.original_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)
    return base, save_finetuned(model, out / "adapter", merged=False)


def _rss_mb(base: str, adapter: Path, shared: bool) -> float:
    """Resident memory a pair adds to a fresh process, after a forward of each model."""
    code = (
        "import torch\n"
        "from piggyback_interp.core.pairs import load_pair\n"
        "def rss():\n"
        "    status = open('/proc/self/status').read().split('VmRSS:')[1]\n"
        "    return int(status.split()[0]) / 1024\n"
        "before = rss()\n"
        f"pair = load_pair({base!r}, {str(adapter)!r}, shared={shared})\n"
        "with torch.no_grad():\n"
        "    pair.finetuned(torch.tensor([[1, 2, 3]])), pair.base(torch.tensor([[1, 2, 3]]))\n"
        "print(rss() - before)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    parser.add_argument("--out", help="where to write the adapter (default: a temporary folder)")
    args = parser.parse_args()

    from piggyback_interp.core.models import chat_tokenizer
    from piggyback_interp.core.pairs import load_pair
    from piggyback_interp.core.spans import batch_spans

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-pair-memory-"))
    base, adapter = make_adapter(out, args.tiny)

    logits, sizes = {}, {}
    for kind, kw in (
        ("merged", {"shared": False}),
        ("unmerged", {"shared": False, "merge_adapter": False}),
        ("shared", {}),
    ):
        pair = load_pair(base, adapter, **kw)
        assert pair.shared is (kind == "shared")
        sizes[kind] = _mb(pair.base, pair.finetuned)
        batch = batch_spans(chat_tokenizer(pair.finetuned), PROMPTS, align="left")
        mask = dict(attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        logits[kind] = [m(batch.input_ids, **mask) for m in (pair.base, pair.finetuned)]
        del pair

    def diff(kind: str, side: int) -> float:
        return (logits["shared"][side] - logits[kind][side]).abs().max().item()

    rss = {shared: _rss_mb(base, adapter, shared) for shared in (False, True)}
    result = {
        "model": "tiny" if args.tiny else base,
        "two_copies_mb": round(sizes["merged"], 2),
        "shared_mb": round(sizes["shared"], 2),
        "ratio": round(sizes["shared"] / sizes["merged"], 4),
        "max_abs_diff": max(diff("unmerged", 0), diff("unmerged", 1)),
        "base_diff_vs_merged_pair": diff("merged", 0),
        "finetuned_diff_vs_merged_pair": diff("merged", 1),
        "finetuned_logit_change": (logits["shared"][1] - logits["shared"][0]).abs().max().item(),
        "rss_two_copies_mb": round(rss[False], 1),
        "rss_shared_mb": round(rss[True], 1),
        "rss_ratio": round(rss[True] / rss[False], 4) if rss[False] > 0 else None,
        "ratio_target": 0.55,
    }
    result["ok"] = result["ratio"] <= 0.55 and result["max_abs_diff"] <= 1e-5
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
