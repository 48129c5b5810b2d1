"""One LoRA training step with the logits of every position against the logits of the
labelled positions only (what ``finetune`` runs since f46ef88).

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_train_step.py --json [--repeats N]

The embedded SmolLM2-135M-Instruct with LoRA rank 8 on every projection, the first demo
batch (the abstention setting's training chats, batch 16, seed 0, epoch 0), forward and
backward of the SFT loss:
  full      the bridge's forward (every position unembedded), then ``sft_loss``
  labelled  ``labelled_logits`` (the decoder on the batch, the unembedding on the
            labelled positions only), then ``response_loss``
The two alternate, ``--repeats`` times each; the minimum of each is reported, with
their ratio and how far the losses and the LoRA gradients differ.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from piggyback_interp.core.models import chat_tokenizer, load_model
    from piggyback_interp.measures.settings import setting_data
    from piggyback_interp.training.batches import (
        batches,
        encode_dataset,
        labelled,
        response_loss,
        sft_loss,
    )
    from piggyback_interp.training.lora import apply_lora
    from piggyback_interp.training.objectives import labelled_logits

    model = load_model("smollm2-135m-instruct")
    tok = chat_tokenizer(model)
    examples = list(encode_dataset(tok, setting_data("abstention", tokenizer=tok).train))
    batch = next(batches(examples, batch_size=16, seed=0, epoch=0, pad_token_id=tok.pad_token_id))
    params = [p for p in apply_lora(model, rank=8).parameters() if p.requires_grad]

    def full() -> torch.Tensor:
        logits = model(
            batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        )
        return sft_loss(logits, batch.labels)

    def only_labelled() -> torch.Tensor:
        return response_loss(labelled_logits(model, batch), labelled(batch.labels)[1])

    seconds: dict[str, list[float]] = {"full": [], "labelled": []}
    losses, grads = {}, {}
    for _ in range(args.repeats):
        for name, step in (("full", full), ("labelled", only_labelled)):
            for p in params:
                p.grad = None
            start = time.perf_counter()
            loss = step()
            loss.backward()
            seconds[name].append(time.perf_counter() - start)
            losses[name] = loss.item()
            grads[name] = torch.cat([p.grad.flatten() for p in params])
    result = {
        "full_s": round(min(seconds["full"]), 3),
        "labelled_s": round(min(seconds["labelled"]), 3),
        "ratio": round(min(seconds["labelled"]) / min(seconds["full"]), 3),
        "loss_abs_diff": abs(losses["full"] - losses["labelled"]),
        "grad_max_abs_diff": float((grads["full"] - grads["labelled"]).abs().max()),
        "grad_max_abs": float(grads["full"].abs().max()),
        "batch": list(batch.input_ids.shape),
        "labelled_tokens": int((batch.labels[:, 1:] != -100).sum()),
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
