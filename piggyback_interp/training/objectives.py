"""What each finetuning method minimises: one objective per :class:`Method`, each returning named loss terms.

An objective maps one micro-batch's :class:`Step` (its batch, logits, SFT loss and
TReFT's K/V drift) to named :class:`Term` s, each an unweighted loss and its weight;
:class:`Loss` adds up the weighted terms in order and logs the unweighted values,
besides ``sft``, ``kv`` and the per-layer ``drift`` that every method logs (so SFT and
TReFT can be compared). :data:`OBJECTIVES` dispatches on the method; adding an
objective is a function here, its entry there and its member of ``Method``.

* ``sft``: the response-only SFT loss (:func:`~piggyback_interp.training.batches.sft_loss`);
* ``treft``: + ``treft_lambda`` x L_KV, TReFT's K/V drift (:mod:`~piggyback_interp.training.treft`);
* ``interleave``: SFT, on the data mixed with retain examples (:func:`interleaved`);
* ``kl_train`` / ``kl_retain``: + ``kl_lambda`` x KL(initial || model) on the training
  batch / a retain batch (:func:`kl_to_reference` against :func:`reference_logprobs`).

Example:
    >>> sorted(m.value for m in OBJECTIVES)
    ['interleave', 'kl_retain', 'kl_train', 'sft', 'treft']
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from jaxtyping import Float

from piggyback_interp.core.errors import UserError
from piggyback_interp.core.hf import logits_at
from piggyback_interp.training.batches import (
    TrainExample,
    batches,
    collate,
    labelled,
    response_loss,
)
from piggyback_interp.training.config import FinetuneConfig, Method, Precision
from piggyback_interp.training.treft import KVRegulariser


class Term(NamedTuple):
    """One named loss term: its unweighted ``value`` (logged) and its ``weight`` in the total."""

    value: torch.Tensor
    weight: float = 1.0


@dataclass(frozen=True)
class Step:
    """One micro-batch as the objectives see it (its forward already run)."""

    loss: Loss
    batch: Any
    logits: torch.Tensor
    """the logits at the batch's labelled positions, ``[n_labelled, vocab]`` (:func:`labelled_logits`)"""
    sft: torch.Tensor
    """the response-only SFT loss"""
    kv: torch.Tensor
    """TReFT's L_KV: the K/V drift from the reference, averaged over layers"""
    number: int
    """the optimizer step (picks kl_retain's retain batch)"""


Objective = Callable[[Step], dict[str, Term]]


def sft(step: Step) -> dict[str, Term]:
    """The SFT loss on the response tokens alone."""
    return {"sft": Term(step.sft)}


def treft(step: Step) -> dict[str, Term]:
    """SFT + ``treft_lambda`` x L_KV (Eqs. 2-3 of TReFT)."""
    return {**sft(step), "kv": Term(step.kv, step.loss.config.treft_lambda)}


def kl_train(step: Step) -> dict[str, Term]:
    """SFT + ``kl_lambda`` x KL(initial || model) on the training batch."""
    kl = kl_to_reference(step.logits, step.batch, step.loss.kl_train)
    return {**sft(step), "kl": Term(kl, step.loss.config.kl_lambda)}


def kl_retain(step: Step) -> dict[str, Term]:
    """SFT + ``kl_lambda`` x KL(initial || model) on a retain batch (one more forward)."""
    batch = step.loss.retain_batch(step.number)
    kl = kl_to_reference(step.loss.forward(batch), batch, step.loss.kl_retain)
    return {**sft(step), "kl": Term(kl, step.loss.config.kl_lambda)}


OBJECTIVES: dict[Method, Objective] = {
    Method.SFT: sft,
    Method.TREFT: treft,
    Method.INTERLEAVE: sft,  # its difference is the data: see interleaved()
    Method.KL_TRAIN: kl_train,
    Method.KL_RETAIN: kl_retain,
}


class Loss:
    """The configured objective's loss of one micro-batch, and the terms logged for it."""

    def __init__(
        self,
        model: Any,
        config: FinetuneConfig,
        reg: KVRegulariser,
        targets: Sequence[Any],
        kl_train: Sequence[torch.Tensor] | None = None,
        retain: Sequence[TrainExample] | None = None,
        kl_retain: Sequence[torch.Tensor] | None = None,
        pad: int = 0,
    ) -> None:
        self.model, self.config, self.reg, self.targets = model, config, reg, targets
        self.kl_train, self.retain, self.kl_retain, self.pad = kl_train, retain, kl_retain, pad
        self.objective = OBJECTIVES[config.method]

    def forward(self, batch: Any) -> torch.Tensor:
        """The model's logits at ``batch``'s labelled positions, ``[n_labelled, vocab]``
        (:func:`labelled_logits`; autocast to bfloat16 with ``mixed_precision``)."""
        autocast = torch.autocast(
            torch.device(self.model.cfg.device).type,
            dtype=torch.bfloat16,
            enabled=self.config.mixed_precision is Precision.BF16,
        )
        with autocast:
            return labelled_logits(self.model, batch)

    def __call__(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The weighted total of the objective's terms, and the logged terms: ``sft``,
        ``kv``, the per-layer ``drift``, then the objective's other terms (``kl``)."""
        with self.reg.recording():
            logits = self.forward(batch)
        _, targets = labelled(batch.labels)
        loss = response_loss(logits, targets.to(logits.device))  # = sft_loss
        per_layer = self.reg.per_layer([self.targets[i] for i in batch.index])
        kv = torch.stack(list(per_layer.values())).mean()
        logged: dict[str, Any] = {
            "sft": loss.item(),
            "kv": kv.item(),
            "drift": {k: v.item() for k, v in per_layer.items()},
        }
        total = None
        for name, term in self.objective(Step(self, batch, logits, loss, kv, step)).items():
            part = term.weight * term.value  # x 1.0 is exact: SFT's total is its loss
            total = part if total is None else total + part
            logged.setdefault(name, term.value.item())
        return total, logged

    def retain_batch(self, step: int) -> Any:
        """The retain batch of optimizer step ``step``: the retain set in its own seeded
        order (seed + 1), epoch after epoch."""
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


def labelled_logits(model: Any, batch: Any) -> Float[torch.Tensor, "n vocab"]:
    """The model's logits at ``batch``'s labelled positions only (:func:`labelled`): the
    unembedding runs on these, not on every position (on a 49k vocabulary, the
    unembedding is a fifth of a 135M model's multiply-adds)."""
    (rows, positions), _ = labelled(batch.labels)
    return logits_at(
        model, batch.input_ids, rows, positions,
        attention_mask=batch.attention_mask, position_ids=batch.position_ids,
    )  # fmt: skip


def reference_logprobs(model: Any, examples: Sequence[TrainExample]) -> list[torch.Tensor]:
    """The model's log-probabilities at every labelled position of every example, computed
    once (before training) and kept on the CPU: ``[n_labelled, vocab]`` each."""
    out = []
    with torch.no_grad():
        for ex in examples:
            logits = labelled_logits(model, collate([ex], pad_token_id=0))
            out.append(logits.float().log_softmax(-1).cpu())
    return out


def kl_to_reference(
    logits: Float[torch.Tensor, "n vocab"], batch: Any, refs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """mean over labelled positions of KL(initial || model): ``logits`` at ``batch``'s
    labelled positions (:func:`labelled_logits`), ``refs`` from
    :func:`reference_logprobs`, indexed by the batch's example indices."""
    ref = torch.cat([refs[i] for i in batch.index]).to(logits.device)
    current = logits.float().log_softmax(-1)
    return (ref.exp() * (ref - current)).sum(-1).mean()


def interleaved(
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


__all__ = [
    "OBJECTIVES",
    "Loss",
    "Objective",
    "Step",
    "Term",
    "interleaved",
    "kl_retain",
    "kl_to_reference",
    "kl_train",
    "labelled_logits",
    "reference_logprobs",
    "sft",
    "treft",
]
