"""One finetuning entry point for SFT, TReFT and the baselines, on the same hooks as the patches.

``finetune(model, data, config)`` trains LoRA adapters (or every weight) on the
response tokens, minimising the configured objective
(:mod:`~piggyback_interp.training.objectives`), records the loss terms and the prefix
K/V drift per layer at every step (for every method, so SFT and TReFT can be
compared), checkpoints atomically, resumes, and exports. Its steps: :func:`_setup`,
:func:`_resume`, :func:`_train` (one :func:`_step` per optimizer step, then
:func:`_checkpoint`), :func:`_finish`.

Example:
    >>> from piggyback_interp.testing import tiny_model
    >>> from piggyback_interp.core.data import ChatDataset
    >>> model = tiny_model("llama")
    >>> data = ChatDataset.from_records(
    ...     [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "I have no idea"}]}] * 4)
    >>> result = finetune(model, data, FinetuneConfig(method="treft", epochs=1, batch_size=2), progress=False)
    >>> len(result.history), sorted(result.history[0])[:3]
    (2, ['drift', 'epoch', 'kv'])
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from piggyback_interp.core import distributed
from piggyback_interp.core.errors import InputTooLongError, UserError
from piggyback_interp.core.hf import hf_model
from piggyback_interp.core.io import atomic_torch_save, atomic_write_text, load_checkpoint
from piggyback_interp.core.models import chat_tokenizer, context_length, model_info
from piggyback_interp.core.provenance import versions
from piggyback_interp.training.batches import (
    EncodedDataset,
    TrainExample,
    batches,
    encode_dataset,
)
from piggyback_interp.training.config import (
    Export,
    FinetuneConfig,
    FinetuneResult,
    Method,
    PostfixReference,
)
from piggyback_interp.training.lora import apply_lora
from piggyback_interp.training.objectives import Loss, interleaved, reference_logprobs
from piggyback_interp.training.sharding import (
    gathered,
    load_optimizer_state,
    load_trainable_state,
    shard_model,
    whole_optimizer_state,
    whole_trainable_state,
)
from piggyback_interp.training.treft import KVRegulariser, kv_reference, region_target

CHECKPOINT = "checkpoint.pt"


def finetune(
    model: Any,
    data: Any,
    config: FinetuneConfig | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    retain: Any = None,
    resume: bool = False,
    progress: bool = True,
    fsdp: bool = False,
    stop_when: Callable[[int, Any], bool] | None = None,
) -> FinetuneResult:
    """Finetune ``model`` in place on chat ``data`` (a ChatDataset or encoded examples).

    The TReFT reference keys/values come from ``model`` itself, once, before the
    first update. With ``out_dir``, a checkpoint (trainable weights, optimizer, step,
    history) is written atomically every ``checkpoint_every`` steps and at the end;
    ``resume=True`` continues from it and ends with the same weights as an
    uninterrupted run of the same seed. At the end ``out_dir`` gets the model as a
    plain HF directory (``model/``, LoRA merged) and/or a peft adapter
    (``adapter/``), per ``config.export``, and ``finetune.json`` (config, data hash,
    versions, loss curve with the SFT and K/V terms, per-layer prefix drift). A non-finite loss stops training with
    ``FloatingPointError`` saying whether a checkpoint exists (the last one is kept) and where.

    Under a launcher (several processes) the micro-batches of each accumulation group are
    shared out and the gradients summed; with ``fsdp=True`` the weights, gradients and
    optimizer state are also sharded over the processes (FSDP2) and ``model`` stays
    sharded afterwards: use it in every process together, or load the export. Either
    way, and with any number of processes, the result is that of one process.

    ``stop_when(step, model)`` is called after every optimizer step (model in eval mode,
    no gradients); when it returns True training ends there (early stopping; one
    process only).
    """
    config = config or FinetuneConfig()
    ckpt = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    run = _setup(model, data, config, retain=retain, fsdp=fsdp, ckpt=ckpt)
    if resume and ckpt is not None and ckpt.is_file():
        _resume(run, ckpt)
    total_steps = config.epochs * math.ceil(run.n_batches / config.grad_accum)
    model.train()
    bar = tqdm(
        total=total_steps,
        initial=run.step,
        disable=not progress or distributed.world()[0] != 0,
        desc=f"finetune ({config.method})",
    )
    try:
        _train(run, bar, stop_when)
    finally:
        bar.close()
        model.eval()
    return _finish(run, data, out_dir)


@dataclass
class _Run:
    """A finetuning run's parts (from :func:`_setup`) and its progress."""

    model: Any
    config: FinetuneConfig
    examples: list[TrainExample]
    long_examples: dict[str, Any]
    loss: Loss
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    peft_model: Any
    sharded: bool
    pad: int
    ckpt: Path | None
    n_batches: int
    history: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    resume_at: tuple[int, int] = (0, 0)
    """the ``(epoch, batch)`` training starts at"""
    saved: int | None = None
    """the step of this run's last checkpoint (written or resumed from)"""


def _setup(
    model: Any, data: Any, config: FinetuneConfig, *, retain: Any, fsdp: bool, ckpt: Path | None
) -> _Run:
    """Encode the data, compute the frozen model's references, add the adapters (and
    shard), and build the optimizer and the objective's loss."""
    tok = chat_tokenizer(model)
    examples = _encode(model, data, config)
    if not examples:
        raise UserError(
            f"no training examples ({len(examples.skipped)} skipped as too long)"
            if examples.skipped
            else "no training examples"
        )
    retain_examples = _encode(model, retain, config) if retain is not None else None
    long_examples = {
        "context_length": context_length(model),
        "max_length": config.max_length,
        "data": examples.summary(),
        "retain": retain_examples.summary() if retain_examples is not None else None,
    }
    if config.method.needs_retain and not retain_examples:
        raise UserError(
            f"method {config.method!r} needs retain=: a chat dataset of aligned examples from other domains"
        )
    if config.method is Method.INTERLEAVE:
        examples = examples + interleaved(retain_examples, len(examples), config)
    first = (
        (examples[0].input_ids, examples[0].spans)
        if config.postfix_reference is PostfixReference.EXAMPLE
        else None
    )
    targets = [
        region_target(ex.input_ids, ex.spans, config.treft_region, postfix_reference=first)
        for ex in examples
    ]
    reference, kl_train, kl_retain = _references(model, config, targets, examples, retain_examples)
    peft_model, params = _trainable(model, config)
    sharded = bool(fsdp and shard_model(model))
    if sharded:  # the parameters are shards now
        params = [p for p in hf_model(model).parameters() if p.requires_grad]
    reg = KVRegulariser(model, reference)
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    loss = Loss(model, config, reg, targets, kl_train, retain_examples, kl_retain, pad)
    n_batches = math.ceil(len(examples) / config.batch_size)
    return _Run(
        model, config, examples, long_examples, loss, params, optimizer, peft_model, sharded,
        pad, ckpt, n_batches,
    )  # fmt: skip


def _references(
    model: Any, config: FinetuneConfig, targets: list[Any], examples: Any, retain: Any
) -> tuple[Any, Any, Any]:
    """The frozen model's TReFT K/V reference and KL log-probabilities (training, retain):
    computed ONCE (on rank 0 when data-parallel) and shared."""
    references = None
    if distributed.is_main():
        references = (
            kv_reference(
                model,
                [t.sequence for t in targets],
                layers=config.treft_layers,
                variant=config.kv_variant,
            ).to("cpu" if distributed.active() else model.cfg.device),
            reference_logprobs(model, examples) if config.method is Method.KL_TRAIN else None,
            reference_logprobs(model, retain) if config.method is Method.KL_RETAIN else None,
        )
    reference, kl_train, kl_retain = distributed.broadcast(references)
    if distributed.active():
        reference = reference.to(model.cfg.device)
    return reference, kl_train, kl_retain


def _trainable(model: Any, config: FinetuneConfig) -> tuple[Any, list[torch.nn.Parameter]]:
    if config.lora_rank is None:
        for p in hf_model(model).parameters():
            p.requires_grad_(True)
        return None, list(hf_model(model).parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(
            config.seed
        )  # LoRA's A init, reproducibly and without global side effects
        peft_model = apply_lora(
            model,
            rank=config.lora_rank,
            alpha=config.lora_alpha,
            target_modules=config.target_modules,
        )
    return peft_model, [p for p in peft_model.parameters() if p.requires_grad]


def _resume(run: _Run, ckpt: Path) -> None:
    """Continue from the checkpoint at ``ckpt``: weights, optimizer, step and history."""
    state = load_checkpoint(ckpt, redo="the training")
    if state["config"] != _config_json(run.config):
        raise UserError(f"{ckpt} was written by another config; delete it or use another out_dir")
    load_trainable_state(run.model, state["trainable"])
    load_optimizer_state(run.optimizer, state["optimizer"])
    run.step, run.resume_at = state["step"], (state["epoch"], state["batch"])
    run.saved = run.step
    run.history = json.loads(state["history"])


def _train(run: _Run, bar: Any, stop_when: Callable[[int, Any], bool] | None) -> None:
    """The epochs from ``run.resume_at``: one :func:`_step` per accumulation group, a
    checkpoint every ``checkpoint_every`` steps and at the end, until ``stop_when``."""
    config = run.config
    start_epoch, start_batch = run.resume_at
    for epoch in range(start_epoch, config.epochs):
        epoch_batches = list(
            batches(
                run.examples,
                batch_size=config.batch_size,
                seed=config.seed,
                epoch=epoch,
                pad_token_id=run.pad,
            )
        )
        first = start_batch if epoch == start_epoch else 0
        for b0 in range(first, run.n_batches, config.grad_accum):
            _step(run, epoch_batches[b0 : b0 + config.grad_accum], epoch)
            bar.update()
            bar.set_postfix(sft=f"{run.history[-1]['sft']:.3f}", kv=f"{run.history[-1]['kv']:.4f}")
            following = b0 + config.grad_accum
            done_all = epoch == config.epochs - 1 and following >= run.n_batches
            if run.ckpt is not None and (
                done_all or (config.checkpoint_every and run.step % config.checkpoint_every == 0)
            ):
                resume_at = (epoch, following) if following < run.n_batches else (epoch + 1, 0)
                _checkpoint(run, resume_at)
                run.saved = run.step
            if stop_when is not None and _should_stop(stop_when, run.step, run.model):
                return


def _step(run: _Run, group: list[Any], epoch: int) -> None:
    """One optimizer step on the accumulation ``group``, its averaged terms logged."""
    size = distributed.world()[1]
    shares = distributed.gather(_accumulate(run.loss, group, run.step, run.sharded))
    bads = [b for _, b in shares if b is not None]
    if bads:
        raise FloatingPointError(
            f"non-finite loss {bads[0]} at step {run.step} (epoch {epoch}); lower lr or "
            f"treft_lambda; {_kept(run.ckpt, run.saved)}"
        )
    if not run.sharded:  # FSDP's reduce-scatter has summed them already
        distributed.sum_gradients(run.params)
    # micro-batch i ran on rank i % size as its (i // size)-th
    terms = [shares[i % size][0][i // size] for i in range(len(group))]
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.history.append(_log(run.step, epoch, terms))


def _accumulate(
    loss: Loss, group: list[Any], step: int, sharded: bool
) -> tuple[list[dict[str, Any]], float | None]:
    """Backward this rank's share of the accumulation ``group`` (micro-batch i runs on
    rank i mod N, weighted 1/len(group)); returns its logged terms and the first
    non-finite loss. Sharded, every rank runs as many passes (each gathers weights from
    all ranks), the short ones a zero-weighted repeat of the first micro-batch, and none
    stops early at a non-finite loss."""
    rank, size = distributed.world()
    share = group[rank::size]
    mine: list[dict[str, Any]] = []
    bad = None
    for k in range(math.ceil(len(group) / size) if sharded else len(share)):
        padding = k >= len(share)
        total, logged = loss(group[0] if padding else share[k], step)
        if bad is None and not math.isfinite(total.item()):
            bad = total.item()
        if bad is not None and not sharded:
            break  # the step is lost anyway; sharded ranks must keep in step
        (total * 0.0 if padding else total / len(group)).backward()
        if not padding:
            mine.append(logged)
    return mine, bad


def _checkpoint(run: _Run, resume_at: tuple[int, int]) -> None:
    """Write the checkpoint atomically on rank 0 (sharded, every rank gathers first):
    whole trainable weights and optimizer state, the ``(epoch, batch)`` to resume at."""
    if not (run.sharded or distributed.is_main()):
        return
    state = {
        "trainable": whole_trainable_state(run.model),
        "optimizer": whole_optimizer_state(run.optimizer),
        "step": len(run.history),  # one entry per optimizer step
        "epoch": resume_at[0],
        "batch": resume_at[1],
        "history": json.dumps(run.history),
        "config": _config_json(run.config),
    }
    if distributed.is_main():
        atomic_torch_save(state, run.ckpt)


def _should_stop(stop_when: Callable[[int, Any], bool], step: int, model: Any) -> bool:
    if distributed.active():
        raise ValueError("stop_when (early stopping) runs in one process only")
    model.eval()
    try:
        with torch.no_grad():
            return bool(stop_when(step, model))
    finally:
        model.train()


def _finish(run: _Run, data: Any, out_dir: str | os.PathLike[str] | None) -> FinetuneResult:
    """Export the model and write ``finetune.json`` (rank 0), and say what produced it."""
    model, config = run.model, run.config
    data_sha = getattr(data, "sha256", None)
    provenance = {
        "model": model_info(model).to_dict()
        if hasattr(model, "piggyback_info")
        else model_info(model).name,
        "config": asdict(config),
        "data_sha256": data_sha,
        "n_examples": len(run.examples),
        "long_examples": run.long_examples,
        "processes": distributed.world()[1],
        "fsdp": run.sharded,
        "versions": versions(),
    }
    if out_dir is not None and config.export is not Export.NONE:
        with gathered(hf_model(model)):  # sharded: whole weights on rank 0
            if distributed.is_main():
                _export(model, Path(out_dir), config)
    if out_dir is not None and distributed.is_main():
        atomic_write_text(
            Path(out_dir) / "finetune.json",
            json.dumps(
                {**provenance, "history": run.history, "steps": run.step}, indent=2, default=str
            ),
        )
    distributed.barrier()  # no rank goes on before rank 0 has written the results
    run.peft_model = None  # the adapters live on in ``model``
    return FinetuneResult(model, config, run.history, run.step, data_sha, provenance)


def _kept(ckpt: Path | None, saved: int | None) -> str:
    """The truth about what a failed run leaves to resume from (``saved``: the step of
    this run's last checkpoint, written or resumed from)."""
    if ckpt is None:
        return "nothing was saved (no out_dir, so no checkpoint)"
    if saved is None:
        earlier = " (the file there is from an earlier run, not resumed)" if ckpt.is_file() else ""
        return f"no checkpoint of this run was written yet: {ckpt} does not hold it{earlier}"
    return (
        f"the last checkpoint, {ckpt} (after step {saved}), is kept: resume=True continues from it"
    )


def _export(model: Any, out: Path, config: FinetuneConfig) -> None:
    from piggyback_interp.training.export import save_finetuned

    if config.export in (Export.MERGED, Export.BOTH):
        save_finetuned(model, out / "model", merged=True)
    if config.export in (Export.ADAPTER, Export.BOTH):
        save_finetuned(model, out / "adapter", merged=False)


def _log(step: int, epoch: int, terms: list[dict[str, Any]]) -> dict[str, Any]:
    """Average the micro-batches' terms: sft, kv (and kl), per-layer drift."""
    n = len(terms)
    out: dict[str, Any] = {"step": step, "epoch": epoch}
    for key in terms[0]:
        if key == "drift":
            out["drift"] = {
                str(layer): sum(t["drift"][layer] for t in terms) / n for layer in terms[0]["drift"]
            }
        else:
            out[key] = sum(t[key] for t in terms) / n
    return out


def _encode(model: Any, data: Any, config: FinetuneConfig) -> EncodedDataset:
    """Encode ``data`` (or check already encoded examples) against the model's context."""
    items = list(data)
    if not (items and isinstance(items[0], TrainExample)):
        return encode_dataset(
            chat_tokenizer(model),
            items,
            system_prompt=config.system_prompt,
            max_length=config.max_length,
            skip_long=config.skip_long,
        )
    limit = context_length(model)
    out = EncodedDataset()
    for index, example in enumerate(items):
        if limit is not None and len(example) > limit:
            reason = (
                f"example {index} has {len(example)} tokens, more than the model's context of "
                f"{limit} tokens (max_position_embeddings); shorten it or set skip_long"
            )
            if not config.skip_long:
                raise InputTooLongError(reason)
            out.skipped.append(reason)
        else:
            out.append(example)
    return out


def _config_json(config: FinetuneConfig) -> str:
    return json.dumps(asdict(config), sort_keys=True, default=list)


__all__ = ["CHECKPOINT", "finetune"]
