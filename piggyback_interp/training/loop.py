"""One finetuning entry point for SFT and TReFT, on the same hooks as the patches.

``finetune(model, data, config)`` trains LoRA adapters (or every weight) on the
response tokens, optionally with TReFT's ``lambda * L_KV`` regulariser, records the
loss terms and the prefix K/V drift per layer at every step (for every method, so
SFT and TReFT can be compared), checkpoints atomically, and resumes.

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

import itertools
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from piggyback_interp.core import distributed
from piggyback_interp.core.checks import Choice, at_least, choices, non_negative, positive
from piggyback_interp.core.errors import InputTooLongError, UserError
from piggyback_interp.core.hf import hf_model
from piggyback_interp.core.io import atomic_torch_save, atomic_write_text, load_checkpoint
from piggyback_interp.core.models import chat_tokenizer, context_length, model_info
from piggyback_interp.core.provenance import versions
from piggyback_interp.training.batches import (
    IGNORE_INDEX,
    EncodedDataset,
    TrainExample,
    batches,
    encode_dataset,
    sft_loss,
)
from piggyback_interp.training.lora import DEFAULT_TARGETS, apply_lora
from piggyback_interp.training.sharding import (
    full,
    gathered,
    load_optimizer_state,
    shard_like,
    shard_model,
    whole_optimizer_state,
)
from piggyback_interp.training.treft import (
    KVRegulariser,
    Region,
    Variant,
    kv_reference,
    region_target,
)


class Method(Choice):
    """What :func:`finetune` minimises, besides the response-only SFT loss."""

    SFT = "sft"  # the SFT loss alone
    TREFT = "treft"  # + treft_lambda x L_KV (the template's K/V drift)
    INTERLEAVE = "interleave"  # SFT on the data mixed with retain examples (retain_ratio)
    KL_TRAIN = "kl_train"  # + kl_lambda x KL(initial || model) on the training data
    KL_RETAIN = "kl_retain"  # + kl_lambda x KL(initial || model) on retain batches

    @property
    def needs_retain(self) -> bool:
        """Whether the method trains on ``retain=`` examples too."""
        return self in (Method.INTERLEAVE, Method.KL_RETAIN)


class Export(Choice):
    """What a run with ``out_dir`` saves: ``model/`` (merged), ``adapter/``, both, none."""

    MERGED = "merged"
    ADAPTER = "adapter"
    BOTH = "both"
    NONE = "none"


class Precision(Choice):
    """``bf16``: autocast the forward to bfloat16 (GPU); the weights stay as loaded."""

    NO = "no"
    BF16 = "bf16"


class PostfixReference(Choice):
    """The postfix region's reference: the ``empty``-query prompt, or the first ``example``."""

    EMPTY = "empty"
    EXAMPLE = "example"


METHODS = Method.values()
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines a finetuning run (recorded with its results).

    Each field's docstring is also its ``piggyback finetune --help`` text.
    """

    method: Method | str = Method.SFT
    """sft; treft (SFT + lambda x template K/V drift); interleave (mix in retain examples);
    kl_train / kl_retain (SFT + KL to the initial model on training / retain batches)"""
    lora_rank: int | None = 8
    """LoRA rank (none: full finetuning of every weight)"""
    lora_alpha: int | None = None
    """LoRA alpha (none: 2 x rank)"""
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    """the linear layers LoRA adapts"""
    lr: float = 2e-4
    """AdamW learning rate"""
    epochs: int = 2
    """passes over the training set"""
    batch_size: int = 8
    """examples per forward"""
    grad_accum: int = 1
    """batches per optimizer step (effective batch = batch_size x grad_accum)"""
    seed: int = 0
    """seed of the data order, LoRA's initialisation and interleaving"""
    system_prompt: str | None = "default"
    """system prompt the examples are rendered with (default: the template's own)"""
    treft_lambda: float = 30.0
    """TReFT: weight of the K/V drift loss"""
    treft_layers: tuple[int, ...] | None = None
    """TReFT: layers whose keys/values are held (none: every layer)"""
    treft_region: Region | str | tuple[int, ...] = Region.PREFIX
    """TReFT: the positions held: prefix, postfix, template (both), query, all, or positions"""
    postfix_reference: PostfixReference | str = PostfixReference.EMPTY
    """TReFT postfix region's reference: empty (the empty-query prompt) or example (the
    first training example's postfix, for every row)"""
    retain_ratio: float = 0.2
    """interleave: the retain set's share of the training mixture"""
    kl_lambda: float = 50.0
    """kl_train / kl_retain: weight of KL(initial || model)"""
    kv_variant: Variant | str = Variant.TRUE
    """TReFT keys/values: true (after the input norm) or pseudo (the released code's
    un-normed projections)"""
    max_length: int | None = None
    """cut examples to this many tokens, never into their response (none: the context)"""
    skip_long: bool = False
    """skip examples longer than the context / max_length instead of raising"""
    checkpoint_every: int = 0
    """optimizer steps between checkpoints (0: at the end only)"""
    mixed_precision: Precision | str = Precision.NO
    """bf16: autocast the forward to bfloat16 (GPU; weights stay as loaded); no: off"""
    export: Export | str = Export.MERGED
    """what is written to out_dir: merged (out_dir/model), adapter (out_dir/adapter), both,
    or none"""

    def __post_init__(self) -> None:
        choices(
            self,
            method=Method,
            kv_variant=Variant,
            export=Export,
            mixed_precision=Precision,
            postfix_reference=PostfixReference,
        )
        if isinstance(self.treft_region, str):
            choices(self, treft_region=Region)
        at_least(self, 1, "epochs", "batch_size", "grad_accum", "lora_rank", "lora_alpha")
        at_least(self, 1, "max_length")
        at_least(self, 0, "checkpoint_every")
        positive(self, "lr")
        non_negative(self, "treft_lambda", "kl_lambda")
        if self.export in (Export.ADAPTER, Export.BOTH) and self.lora_rank is None:
            raise UserError(
                "export='adapter' needs LoRA (lora_rank); full finetunes export merged weights"
            )
        if not 0 < self.retain_ratio < 1:
            raise UserError(f"retain_ratio must be in (0, 1), got {self.retain_ratio}")


@dataclass
class FinetuneResult:
    """The trained model (adapters in place) and what produced it."""

    model: Any
    config: FinetuneConfig
    history: list[dict[str, Any]]
    steps: int
    data_sha256: str | None
    provenance: dict[str, Any] = field(default_factory=dict)


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


def _label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits predict a labelled token: ``t`` with ``labels[t + 1] != -100``."""
    return (labels[1:] != IGNORE_INDEX).nonzero().flatten()


def reference_logprobs(model: Any, examples: Sequence[TrainExample]) -> list[torch.Tensor]:
    """The model's log-probabilities at every labelled position of every example, computed
    once (before training) and kept on the CPU: ``[n_labelled, vocab]`` each."""
    out = []
    with torch.no_grad():
        for ex in examples:
            logits = model(torch.tensor([ex.input_ids], device=model.cfg.device))[0]
            pos = _label_positions(torch.tensor(ex.labels)).to(logits.device)
            out.append(logits[pos].float().log_softmax(-1).cpu())
    return out


def _kl_to_reference(
    logits: torch.Tensor, batch: Any, refs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """mean over labelled positions of KL(initial || model)."""
    terms = []
    for row, i in enumerate(batch.index):
        pos = _label_positions(batch.labels[row]).to(logits.device)
        current = logits[row, pos].float().log_softmax(-1)
        ref = refs[i].to(current.device)
        terms.append((ref.exp() * (ref - current)).sum(-1))
    return torch.cat(terms).mean()


class _Objective:
    """The loss of one batch for the configured method, with its logged terms."""

    def __init__(
        self, model, config, reg, targets, kl_train=None, retain=None, kl_retain=None, pad=0
    ):
        self.model, self.config, self.reg, self.targets = model, config, reg, targets
        self.kl_train, self.retain, self.kl_retain, self.pad = kl_train, retain, kl_retain, pad

    def _forward(self, batch: Any) -> torch.Tensor:
        device = self.model.cfg.device
        autocast = torch.autocast(
            torch.device(device).type,
            dtype=torch.bfloat16,
            enabled=self.config.mixed_precision is Precision.BF16,
        )
        with autocast:
            return self.model(
                batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                position_ids=batch.position_ids.to(device),
            )

    def __call__(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        config = self.config
        with self.reg.recording():
            logits = self._forward(batch)
        sft = sft_loss(logits, batch.labels.to(logits.device))
        per_layer = self.reg.per_layer([self.targets[i] for i in batch.index])
        kv = torch.stack(list(per_layer.values())).mean()
        total = sft
        terms: dict[str, Any] = {
            "sft": sft.item(),
            "kv": kv.item(),
            "drift": {k: v.item() for k, v in per_layer.items()},
        }
        match config.method:
            case Method.TREFT:
                total = total + config.treft_lambda * kv
            case Method.KL_TRAIN:
                kl = _kl_to_reference(logits, batch, self.kl_train)
                total, terms["kl"] = total + config.kl_lambda * kl, kl.item()
            case Method.KL_RETAIN:
                retain_batch = self._retain_batch(step)
                kl = _kl_to_reference(self._forward(retain_batch), retain_batch, self.kl_retain)
                total, terms["kl"] = total + config.kl_lambda * kl, kl.item()
        return total, terms

    def _retain_batch(self, step: int) -> Any:
        n = math.ceil(len(self.retain) / self.config.batch_size)
        epoch, i = divmod(step, n)
        chunk = batches(
            self.retain,
            batch_size=self.config.batch_size,
            seed=self.config.seed + 1,
            epoch=epoch,
            pad_token_id=self.pad,
        )
        return next(itertools.islice(chunk, i, None))


def _accumulate(
    objective: _Objective, group: list[Any], step: int, sharded: bool
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
        total, logged = objective(group[0] if padding else share[k], step)
        if bad is None and not math.isfinite(total.item()):
            bad = total.item()
        if bad is not None and not sharded:
            break  # the step is lost anyway; sharded ranks must keep in step
        (total * 0.0 if padding else total / len(group)).backward()
        if not padding:
            mine.append(logged)
    return mine, bad


def _checkpoint(
    path: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    config: FinetuneConfig,
    history: list[dict[str, Any]],
    resume_at: tuple[int, int],
    *,
    sharded: bool,
) -> None:
    """Write the checkpoint atomically on rank 0 (sharded, every rank gathers first):
    whole trainable weights and optimizer state, the ``(epoch, batch)`` to resume at."""
    if not (sharded or distributed.is_main()):
        return
    state = {
        "trainable": _trainable_state(model),
        "optimizer": whole_optimizer_state(optimizer),
        "step": len(history),  # one entry per optimizer step
        "epoch": resume_at[0],
        "batch": resume_at[1],
        "history": json.dumps(history),
        "config": _config_json(config),
    }
    if distributed.is_main():
        atomic_torch_save(state, path)


def _should_stop(stop_when: Callable[[int, Any], bool], step: int, model: Any) -> bool:
    if distributed.active():
        raise ValueError("stop_when (early stopping) runs in one process only")
    model.eval()
    try:
        with torch.no_grad():
            return bool(stop_when(step, model))
    finally:
        model.train()


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
        examples = examples + _interleaved(retain_examples, len(examples), config)
    first = (
        (examples[0].input_ids, examples[0].spans)
        if config.postfix_reference is PostfixReference.EXAMPLE
        else None
    )
    targets = [
        region_target(ex.input_ids, ex.spans, config.treft_region, postfix_reference=first)
        for ex in examples
    ]
    # the frozen model's references: computed ONCE (on rank 0 when data-parallel) and shared
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
            reference_logprobs(model, retain_examples)
            if config.method is Method.KL_RETAIN
            else None,
        )
    reference, kl_train, kl_retain = distributed.broadcast(references)
    if distributed.active():
        reference = reference.to(model.cfg.device)
    peft_model, params = _trainable(model, config)
    sharded = bool(fsdp and shard_model(model))
    if sharded:  # the parameters are shards now
        params = [p for p in hf_model(model).parameters() if p.requires_grad]
    reg = KVRegulariser(model, reference)
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    history: list[dict[str, Any]] = []
    step, start_epoch, start_batch = 0, 0, 0
    saved = None  # the step of the last checkpoint of this run
    ckpt = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    if resume and ckpt is not None and ckpt.is_file():
        state = load_checkpoint(ckpt, redo="the training")
        if state["config"] != _config_json(config):
            raise UserError(
                f"{ckpt} was written by another config; delete it or use another out_dir"
            )
        _load_trainable(model, state["trainable"])
        load_optimizer_state(optimizer, state["optimizer"])
        step, start_epoch, start_batch = state["step"], state["epoch"], state["batch"]
        saved = step
        history = json.loads(state["history"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    objective = _Objective(model, config, reg, targets, kl_train, retain_examples, kl_retain, pad)
    n_batches = math.ceil(len(examples) / config.batch_size)
    total_steps = config.epochs * math.ceil(n_batches / config.grad_accum)
    model.train()
    rank, size = distributed.world()
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not progress or rank != 0,
        desc=f"finetune ({config.method})",
    )
    try:
        for epoch in range(start_epoch, config.epochs):
            epoch_batches = list(
                batches(
                    examples,
                    batch_size=config.batch_size,
                    seed=config.seed,
                    epoch=epoch,
                    pad_token_id=pad,
                )
            )
            first = start_batch if epoch == start_epoch else 0
            for b0 in range(first, n_batches, config.grad_accum):
                group = epoch_batches[b0 : b0 + config.grad_accum]
                shares = distributed.gather(_accumulate(objective, group, step, sharded))
                bads = [b for _, b in shares if b is not None]
                if bads:
                    raise FloatingPointError(
                        f"non-finite loss {bads[0]} at step {step} (epoch {epoch}); lower lr or "
                        f"treft_lambda; {_kept(ckpt, saved)}"
                    )
                if not sharded:  # FSDP's reduce-scatter has summed them already
                    distributed.sum_gradients(params)
                # micro-batch i ran on rank i % size as its (i // size)-th
                terms = [shares[i % size][0][i // size] for i in range(len(group))]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                history.append(_log(step, epoch, terms))
                bar.update()
                bar.set_postfix(sft=f"{history[-1]['sft']:.3f}", kv=f"{history[-1]['kv']:.4f}")
                done_all = epoch == config.epochs - 1 and b0 + config.grad_accum >= n_batches
                if ckpt is not None and (
                    done_all or (config.checkpoint_every and step % config.checkpoint_every == 0)
                ):
                    following = b0 + config.grad_accum
                    _checkpoint(
                        ckpt,
                        model,
                        optimizer,
                        config,
                        history,
                        (epoch, following) if following < n_batches else (epoch + 1, 0),
                        sharded=sharded,
                    )
                    saved = step
                if stop_when is not None and _should_stop(stop_when, step, model):
                    break
            else:
                continue
            break  # stop_when ended training
    finally:
        bar.close()
        model.eval()
    data_sha = getattr(data, "sha256", None)
    provenance = {
        "model": model_info(model).to_dict()
        if hasattr(model, "piggyback_info")
        else model_info(model).name,
        "config": asdict(config),
        "data_sha256": data_sha,
        "n_examples": len(examples),
        "long_examples": long_examples,
        "processes": size,
        "fsdp": sharded,
        "versions": versions(),
    }
    if out_dir is not None and config.export is not Export.NONE:
        with gathered(hf_model(model)):  # sharded: whole weights on rank 0
            if distributed.is_main():
                _export(model, Path(out_dir), config)
    if out_dir is not None and distributed.is_main():
        atomic_write_text(
            Path(out_dir) / "finetune.json",
            json.dumps({**provenance, "history": history, "steps": step}, indent=2, default=str),
        )
    distributed.barrier()  # no rank goes on before rank 0 has written the results
    del peft_model  # the adapters live on in ``model``
    return FinetuneResult(model, config, history, step, data_sha, provenance)


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


def _interleaved(
    retain: list[TrainExample], n_train: int, config: FinetuneConfig
) -> list[TrainExample]:
    """Retain examples making up ``retain_ratio`` of the mixture (sampled with the seed)."""
    n = round(n_train * config.retain_ratio / (1 - config.retain_ratio))
    if n > len(retain):
        raise UserError(
            f"interleaving {config.retain_ratio:.0%} needs {n} retain examples for {n_train} "
            f"training examples, but retain has {len(retain)}; add retain examples or lower retain_ratio"
        )
    return random.Random(f"{config.seed}:retain").sample(retain, n)


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The trainable weights, whole (a collective when sharded)."""
    return {
        n: full(p.detach()).clone()
        for n, p in hf_model(model).named_parameters()
        if p.requires_grad
    }


def _load_trainable(model: Any, state: dict[str, torch.Tensor]) -> None:
    params = dict(hf_model(model).named_parameters())
    missing = set(state) - set(params)
    if missing:
        raise ValueError(f"the checkpoint has weights this model lacks, e.g. {sorted(missing)[:2]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(shard_like(value, params[name]))


def _config_json(config: FinetuneConfig) -> str:
    return json.dumps(asdict(config), sort_keys=True, default=list)


__all__ = [
    "METHODS",
    "Export",
    "FinetuneConfig",
    "FinetuneResult",
    "Method",
    "PostfixReference",
    "Precision",
    "finetune",
]
