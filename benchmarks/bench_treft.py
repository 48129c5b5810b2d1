"""Cost of TReFT over SFT per optimizer step, and of the naive frozen-copy TReFT.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_treft.py --json [--steps N] [--batch-size B]
       [--device cuda] [--dtype bfloat16] [--model DIR]
Targets (issue 4): time_ratio <= 1.10, memory_ratio <= 1.10 (TReFT over SFT).

All three methods train LoRA (rank 8, every linear layer, fp32 on CPU) on the embedded
SmolLM2-135M-Instruct with the same 16 chat examples (default system prompt), the same
batches and the same seed:
  sft    finetune's step with method="sft" (it still logs the prefix K/V drift)
  treft  finetune's step with method="treft" (default lambda): the reference K/V come
         from ``kv_reference``, once per distinct prefix, before training
  naive  a frozen deep copy of the initial model runs on every batch, every step
         (no_grad), and its K/V at the prefix positions are the reference
Each method runs in its own subprocess (hidden ``--only METHOD``): 1 untimed warm-up
step, then ``--steps`` timed steps (mean seconds per step), then the peak memory:
``ru_maxrss`` of that process on CPU (the absolute peak, model load included), or
``torch.cuda.max_memory_allocated`` on CUDA. ``tokens_per_row`` is the mean padded width.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time

import torch

METHODS = ("sft", "treft", "naive")
PAIRS = [
    line.split(" | ")
    for line in """\
Can my landlord keep my deposit? | Usually not, unless you caused damage beyond normal wear and tear.
How do I make new friends? | Join a club or class about something you enjoy and show up regularly.
What should I cook for dinner? | A quick stir-fry with vegetables, rice and a protein is easy and healthy.
Is it safe to swim after eating? | Yes, a light meal before swimming is fine for almost everyone.
How can I sleep better at night? | Keep a regular schedule and avoid screens for an hour before bed.
What is a good hobby for winter? | Knitting, reading or indoor climbing all keep you busy when it is cold.
How do I fix a flat bike tire? | Remove the tube, find the hole, patch it and pump the tire back up.
Should I learn piano or guitar? | Pick the one whose music you love most; both are great first instruments.
Why is the sky blue during the day? | Air scatters blue sunlight much more strongly than red light.
How often should I water a cactus? | About every two weeks in summer and far less often in winter.
What makes a good job interview? | Clear examples of your past work and good questions about the role.
How do I start running every day? | Begin with short, easy runs and increase the distance slowly each week.
What is the capital of France? | The capital of France is Paris, on the river Seine.
How do plants make food? | They use sunlight, water and carbon dioxide to make sugar by photosynthesis.
Why do cats purr? | Cats purr when they are content, and sometimes to calm themselves down.
How can I save money each month? | Set a budget, track your spending and move savings out on payday.
""".splitlines()
]


def kv_hooks(model, layers, store):
    """fwd hooks that keep each layer's K/V as [batch, pos, features] in ``store``."""
    from piggyback_interp.core.hooks import KV_SITES, resolve_site

    def keep(key, pos_dim):
        def hook(act, hook):
            store[key] = act.movedim(pos_dim, 1).flatten(2)
            return act

        return hook

    sites = {s: resolve_site(model, s) for s in KV_SITES}
    return [
        (site.name(layer), keep((s, layer), site.pos_dim))
        for layer in layers
        for s, site in sites.items()
    ]


class _Done(Exception):
    """Raised by the step clock once the warm-up and timed steps are done."""


def run_one(method: str, args) -> dict:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from piggyback_interp.core.data import ChatDataset
    from piggyback_interp.core.models import chat_tokenizer, load_model
    from piggyback_interp.training import FinetuneConfig, finetune
    from piggyback_interp.training.batches import batches, encode_dataset

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = load_model(args.model, device=args.device, dtype=dtype)
    tok = chat_tokenizer(model)
    data = ChatDataset.from_records(
        [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in PAIRS
        ]
    )
    examples = encode_dataset(tok, data, system_prompt="default")
    n_steps = 1 + args.steps  # the warm-up step + the timed ones
    per_epoch = -(-len(examples) // args.batch_size)
    config = FinetuneConfig(
        method="sft" if method == "sft" else "treft",
        batch_size=args.batch_size,
        epochs=-(-n_steps // per_epoch),
    )
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    stamps: list[float] = []

    def clock(optimizer, *_):  # after every optimizer step: one timestamp
        sync()
        stamps.append(time.perf_counter())
        if len(stamps) == n_steps:
            raise _Done

    handle = register_optimizer_step_post_hook(clock)
    try:
        if method == "naive":
            naive_treft(model, examples, config, tok, n_steps)
        else:
            finetune(model, examples, config, progress=False)
    except _Done:
        pass
    handle.remove()
    step_s = (stamps[-1] - stamps[0]) / args.steps  # from the end of the warm-up step
    if args.device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    widths = [
        b.input_ids.shape[1]
        for e in range(config.epochs)
        for b in batches(
            examples, batch_size=config.batch_size, seed=config.seed, epoch=e, pad_token_id=0
        )
    ][:n_steps]
    return {
        "step_s": step_s,
        "peak_mb": peak_mb,
        "tokens_per_row": round(sum(widths) / len(widths), 1),
        "torch_threads": torch.get_num_threads(),
    }


def naive_treft(model, examples, config, tok, n_steps):
    """TReFT with a frozen copy of the initial model run on every batch for the reference K/V."""
    from piggyback_interp.core.hooks import KV_SITES, resolve_layers
    from piggyback_interp.training import relative_sq_error
    from piggyback_interp.training.batches import batches, sft_loss
    from piggyback_interp.training.lora import apply_lora

    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    torch.manual_seed(config.seed)
    peft_model = apply_lora(
        model, rank=config.lora_rank, alpha=config.lora_alpha, target_modules=config.target_modules
    )
    optimizer = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=config.lr
    )
    layers = resolve_layers(model, config.treft_layers)
    ref_seen, cur_seen = {}, {}
    ref_hooks, cur_hooks = kv_hooks(frozen, layers, ref_seen), kv_hooks(model, layers, cur_seen)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dev = model.cfg.device
    model.train()
    for epoch in range(config.epochs):
        for batch in batches(
            examples, batch_size=config.batch_size, seed=config.seed, epoch=epoch, pad_token_id=pad
        ):
            ids = batch.input_ids.to(dev)
            inputs = dict(
                attention_mask=batch.attention_mask.to(dev), position_ids=batch.position_ids.to(dev)
            )
            with torch.no_grad(), frozen.hooks(fwd_hooks=ref_hooks):
                frozen(ids, **inputs)
            with model.hooks(fwd_hooks=cur_hooks):
                logits = model(ids, **inputs)
            per_layer = []
            for layer in layers:
                rows = [
                    sum(
                        relative_sq_error(cur_seen[(s, layer)][r, :n], ref_seen[(s, layer)][r, :n])
                        for s in KV_SITES
                    )
                    for r, n in enumerate(len(p) for p in batch.prefixes)
                ]
                per_layer.append(torch.stack(rows).mean())
            kv = torch.stack(per_layer).mean()
            (sft_loss(logits, batch.labels.to(dev)) + config.treft_lambda * kv).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name or directory")
    parser.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1")
    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return
    res = {}
    for method in METHODS:
        cmd = [
            sys.executable,
            __file__,
            "--only",
            method,
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--model",
            args.model,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
        res[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    sft, treft = res["sft"], res["treft"]
    out = {
        "sft_step_s": round(sft["step_s"], 3),
        "treft_step_s": round(treft["step_s"], 3),
        "naive_treft_step_s": round(res["naive"]["step_s"], 3),
        "time_ratio": round(treft["step_s"] / sft["step_s"], 3),
        "sft_peak_mb": round(sft["peak_mb"], 1),
        "treft_peak_mb": round(treft["peak_mb"], 1),
        "memory_ratio": round(treft["peak_mb"] / sft["peak_mb"], 3),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "tokens_per_row": sft["tokens_per_row"],
        "device": args.device,
        "dtype": args.dtype,
        "model": args.model,
        "torch_threads": sft["torch_threads"],
    }
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
