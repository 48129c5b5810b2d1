"""Training state held per process: data-parallel (whole copies) against FSDP (shards).

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_fsdp.py --json [--processes 2]
       [--lora-rank 8] [--model DIR]

A full finetune (every weight; ``--lora-rank R`` for LoRA) of the embedded
SmolLM2-135M-Instruct in fp32 on the CPU, with ``--processes`` gloo processes, once
data-parallel (``finetune(...)``) and once sharded (``finetune(..., fsdp=True)``): the
first 8 chats of ``bench_treft.py``, batch 2, 2 micro-batches per step, 2 epochs: 4
optimizer steps. At each optimizer step, inside every process, it counts the bytes that process holds of the weights, of the
gradients and of the Adam state (a shard's local part under FSDP); the JSON reports
rank 0's counts at the last step, their FSDP / data-parallel ratios (1 / processes is
ideal), the mean seconds per step after the first, and whether both runs ended with
the same weights (max absolute difference).

Process memory, rank 0: ``anon_mb`` is the largest ``RssAnon`` (anonymous memory, not
file pages) seen at an optimizer step; ``peak_rss_mb`` is ``ru_maxrss``, which also
counts the model's safetensors pages that sharding reads through its memory map and
the whole model every process loads before sharding. The workers run with
``MALLOC_MMAP_THRESHOLD_=65536`` (unless set) so that glibc returns freed tensors to
the system; with its default, the memory of the whole weights freed by sharding stays
in the process and the RSS hides the saving.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_treft import PAIRS  # the same chats as the TReFT benchmark (first 8)


def _bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def _rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")  # not Linux


def _worker(rank: int, size: int, store: str, fsdp: bool, args, out: str) -> None:
    import torch.distributed as dist

    from piggyback_interp.core.data import ChatDataset
    from piggyback_interp.core.models import load_model
    from piggyback_interp.training import FinetuneConfig, finetune
    from piggyback_interp.training.sharding import whole_trainable_state

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    try:
        model = load_model(args.model, device="cpu", dtype=torch.float32)
        data = ChatDataset.from_records(
            [
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in PAIRS[:8]
            ]
        )
        config = FinetuneConfig(
            method="sft",
            lora_rank=args.lora_rank,
            lr=1e-5,
            epochs=2,
            batch_size=2,
            grad_accum=2,
            export="none",
        )
        held: dict[str, float] = {}
        times: list[float] = []
        original = torch.optim.AdamW.step

        def counting_step(self, *a, **kw):  # the state at its largest: grads and Adam state
            result = original(self, *a, **kw)
            params = [p for g in self.param_groups for p in g["params"]]
            held["weights"] = _bytes(model.original_model.parameters())
            held["gradients"] = _bytes(p.grad for p in params if p.grad is not None)
            held["adam_state"] = _bytes(
                v for s in self.state.values() for v in s.values() if v.dim() > 0
            )
            held["anon_mb"] = max(held.get("anon_mb", 0), _rss_anon_mb())
            times.append(time.perf_counter())
            return result

        torch.optim.AdamW.step = counting_step
        start = time.perf_counter()
        finetune(model, data, config, progress=False, fsdp=fsdp)
        torch.optim.AdamW.step = original
        steps = [b - a for a, b in zip([start, *times], times, strict=False)]
        weights = whole_trainable_state(model)  # whole tensors (every rank takes part)
        if rank == 0:
            torch.save(
                {
                    "held": held,
                    "step_s": sum(steps[1:]) / (len(steps) - 1),  # the first includes set-up
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "weights": weights,
                },
                out,
            )
    finally:
        dist.destroy_process_group()


def run(fsdp: bool, args) -> dict:
    import torch.multiprocessing as mp

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # read by the workers' glibc
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.pt")
        mp.spawn(
            _worker,
            args=(args.processes, str(Path(tmp) / "store"), fsdp, args, out),
            nprocs=args.processes,
            join=True,
        )
        return torch.load(out, weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument(
        "--lora-rank", type=int, default=None, help="LoRA rank (default: full finetune)"
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name or directory")
    args = parser.parse_args()
    if args.processes < 2:
        parser.error("--processes must be >= 2: one process shards nothing")
    ddp, fsdp = run(False, args), run(True, args)
    diff = max((ddp["weights"][n] - fsdp["weights"][n]).abs().max().item() for n in ddp["weights"])
    mb = 2**20
    anon = {"ddp": ddp["held"].pop("anon_mb"), "fsdp": fsdp["held"].pop("anon_mb")}
    result = {
        "model": args.model,
        "processes": args.processes,
        "trained": "full" if args.lora_rank is None else f"LoRA rank {args.lora_rank}",
        **{f"ddp_{k}_mb": round(v / mb, 1) for k, v in ddp["held"].items()},
        **{f"fsdp_{k}_mb": round(v / mb, 1) for k, v in fsdp["held"].items()},
        **{
            f"{k}_ratio": round(fsdp["held"][k] / ddp["held"][k], 3)
            for k in ddp["held"]
            if ddp["held"][k]
        },
        "ddp_step_s": round(ddp["step_s"], 2),
        "fsdp_step_s": round(fsdp["step_s"], 2),
        "ddp_anon_mb": round(anon["ddp"]),
        "fsdp_anon_mb": round(anon["fsdp"]),
        "ddp_peak_rss_mb": round(ddp["peak_rss_mb"]),
        "fsdp_peak_rss_mb": round(fsdp["peak_rss_mb"]),
        "max_abs_weight_diff": diff,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    sys.exit(main())
