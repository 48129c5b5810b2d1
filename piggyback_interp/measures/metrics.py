"""Logit metrics for patching sweeps (text detectors live in :mod:`piggyback_interp.measures.detectors`).

**Logit metrics** (:class:`LogitMetric`) score teacher-forced continuations. A metric
says which token sequences it appends after every prompt (:meth:`~LogitMetric.continuations`)
and turns the logits that predict those tokens into one value per prompt. A fast
engine only needs the logits at the positions a metric reads: for a continuation
``c`` of length ``L`` after a prompt of length ``P`` these are positions
``P - 1 .. P + L - 2`` (the last ``L`` positions of ``prompt + c[:-1]``); an empty
continuation reads the next-token logits at position ``P - 1``.
:func:`metric_on_model` is the slow, obvious reference implementation.

Example:
    >>> import torch
    >>> metric = TargetLogProb([3, 1])                   # token ids, or a string + tokenizer
    >>> metric.continuations(None)
    [[3, 1]]
    >>> logits = [torch.zeros(2, 2, 4)]                  # uniform over 4 tokens, 2 prompts
    >>> metric(logits)                                   # 2 * log(1/4) per prompt
    tensor([-2.7726, -2.7726])
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from piggyback_interp.core.errors import UserError
from piggyback_interp.core.hf import last_logits
from piggyback_interp.core.spans import ChatBatch

Reduce = Literal["sum", "mean"]
KLDirection = Literal["ref_to_model", "model_to_ref"]


# ================================================================ logit metrics


class LogitMetric(abc.ABC):
    """A metric read from the logits that predict teacher-forced continuation tokens.

    Subclasses define :meth:`continuations` and :meth:`__call__`. ``logits[i][:, j]``
    predicts token ``j`` of continuation ``i`` (``logits[i][:, 0]`` sits at the last
    prompt position); a next-token metric has the single continuation ``[]`` and gets
    ``[next_token_logits[:, None]]``.

    Example:
        >>> import torch
        >>> class Top(LogitMetric):
        ...     name = "next_token_max_logit"
        ...     def continuations(self, tokenizer):
        ...         return [[]]
        ...     def __call__(self, logits):
        ...         return logits[0][:, 0].max(-1).values
        >>> Top().n_read(None), Top()([torch.arange(6.0).reshape(2, 1, 3)])
        ([1], tensor([2., 5.]))
    """

    name: str = "logit_metric"

    @abc.abstractmethod
    def continuations(self, tokenizer: Any) -> list[list[int]]:
        """Token ids appended after the prompt, one list per continuation.

        ``[]`` means the metric reads only the next-token logits at the last prompt
        position.
        """

    def n_read(self, tokenizer: Any) -> list[int]:
        """Number of final positions read per continuation (``len(c)``; 1 for ``[]``)."""
        return [len(c) or 1 for c in self.continuations(tokenizer)]

    @abc.abstractmethod
    def __call__(
        self, logits: Sequence[Float[Tensor, "batch _n vocab"]]
    ) -> Float[Tensor, " batch"]:
        """One value per prompt from the logits that predict the continuation tokens."""


def _target_ids(target: str | Sequence[int], tokenizer: Any) -> tuple[int, ...]:
    if isinstance(target, str):
        if tokenizer is None:
            raise ValueError(
                f"the target {target!r} is text: pass a tokenizer to continuations(), "
                "or give the target as token ids"
            )
        ids = tuple(tokenizer.encode(target, add_special_tokens=False))
        if not ids:
            raise UserError(f"the target {target!r} tokenizes to no tokens; give a non-empty one")
        return ids
    return tuple(int(t) for t in target)


def _check_target(target: str | Sequence[int], what: str = "target") -> str | tuple[int, ...]:
    if isinstance(target, str):
        if target == "":
            raise UserError(f"the {what} is empty; give a non-empty string or token ids")
        return target
    ids = tuple(int(t) for t in target)
    if not ids:
        raise UserError(f"the {what} has no token ids; give at least one")
    if min(ids) < 0:
        raise ValueError(f"the {what} has negative token ids {ids}")
    return ids


def _check_logits(logits: Sequence[Tensor], n_read: Sequence[int], metric: str) -> list[Tensor]:
    logits = list(logits)
    if len(logits) != len(n_read):
        raise ValueError(
            f"{metric} reads {len(n_read)} continuation(s) but got logits for {len(logits)}"
        )
    for i, (block, n) in enumerate(zip(logits, n_read, strict=True)):
        if block.ndim != 3 or block.shape[1] != n:
            raise ValueError(
                f"{metric}: logits[{i}] has shape {tuple(block.shape)}; expected "
                f"(batch, {n}, vocab): one position per token of continuation {i}"
            )
    return logits


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """float32 at least: log-softmax over a vocabulary is lossy in half precision."""
    return torch.promote_types(logits.dtype, torch.float32)


def token_logprobs(
    logits: Float[Tensor, "batch n vocab"], ids: Sequence[int] | Int[Tensor, " n"]
) -> Float[Tensor, "batch n"]:
    """Log-probability of token ``ids[j]`` under ``logits[:, j]`` (float32 or wider).

    Example:
        >>> import torch
        >>> token_logprobs(torch.zeros(1, 2, 4), [0, 3])
        tensor([[-1.3863, -1.3863]])
    """
    if not isinstance(ids, Tensor) and ids and max(ids) >= logits.shape[-1]:
        raise ValueError(
            f"token id {max(ids)} is outside the logits' vocabulary of {logits.shape[-1]}"
        )
    ids = torch.as_tensor(ids, dtype=torch.long, device=logits.device)
    logprobs = logits.to(_compute_dtype(logits)).log_softmax(-1)
    index = ids.view(1, -1, 1).expand(logits.shape[0], -1, 1)
    return logprobs.gather(-1, index).squeeze(-1)


class TargetLogProb(LogitMetric):
    """Log-probability of a target continuation, e.g. ``"I have no idea about your question"``.

    A text target is tokenized with ``add_special_tokens=False`` when
    :meth:`continuations` is called; the metric remembers those ids and scores them.
    ``reduce="sum"`` gives ``log p(target | prompt)``; ``"mean"`` the mean per token.

    Example:
        >>> import torch
        >>> from piggyback_interp.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> metric = TargetLogProb("I have no idea", reduce="mean")
        >>> n = len(metric.continuations(tok)[0])
        >>> metric([torch.zeros(3, n, 512)])               # uniform: log(1/512) per token
        tensor([-6.2383, -6.2383, -6.2383])
    """

    name = "target_logprob"

    def __init__(
        self, target: str | Sequence[int], *, reduce: Reduce = "sum", name: str | None = None
    ) -> None:
        if reduce not in ("sum", "mean"):
            raise ValueError(f"unknown reduce {reduce!r}; choose 'sum' or 'mean'")
        self.target = _check_target(target)
        self.reduce = reduce
        self.ids: tuple[int, ...] | None = None if isinstance(self.target, str) else self.target
        if name is not None:
            self.name = name

    def continuations(self, tokenizer: Any) -> list[list[int]]:
        self.ids = _target_ids(self.target, tokenizer)
        return [list(self.ids)]

    def __call__(
        self, logits: Sequence[Float[Tensor, "batch _n vocab"]]
    ) -> Float[Tensor, " batch"]:
        if self.ids is None:
            raise RuntimeError(
                f"the text target {self.target!r} has no token ids yet: call "
                "metric.continuations(tokenizer) first (metric_on_model and sweeps do)"
            )
        (block,) = _check_logits(logits, [len(self.ids)], self.name)
        logprobs = token_logprobs(block, self.ids)
        return logprobs.sum(-1) if self.reduce == "sum" else logprobs.mean(-1)


class LogOdds(LogitMetric):
    """``log p(positive) - log p(negative)``, each the summed log-prob of its tokens.

    Example:
        >>> import torch
        >>> metric = LogOdds([1], [2, 2])
        >>> metric.continuations(None)
        [[1], [2, 2]]
        >>> metric([torch.zeros(1, 1, 4), torch.zeros(1, 2, 4)])   # log(1/4) - 2 log(1/4)
        tensor([1.3863])
    """

    name = "log_odds"

    def __init__(
        self,
        positive: str | Sequence[int],
        negative: str | Sequence[int],
        *,
        name: str | None = None,
    ) -> None:
        self.positive = TargetLogProb(_check_target(positive, "positive continuation"))
        self.negative = TargetLogProb(_check_target(negative, "negative continuation"))
        if name is not None:
            self.name = name

    def continuations(self, tokenizer: Any) -> list[list[int]]:
        return self.positive.continuations(tokenizer) + self.negative.continuations(tokenizer)

    def __call__(
        self, logits: Sequence[Float[Tensor, "batch _n vocab"]]
    ) -> Float[Tensor, " batch"]:
        if self.positive.ids is None or self.negative.ids is None:
            raise RuntimeError(
                "the text continuations have no token ids yet: call "
                "metric.continuations(tokenizer) first (metric_on_model and sweeps do)"
            )
        pos, neg = _check_logits(
            logits, [len(self.positive.ids), len(self.negative.ids)], self.name
        )
        return self.positive([pos]) - self.negative([neg])


def kl_from_logprobs(
    p_logprobs: Float[Tensor, "batch vocab"], q_logprobs: Float[Tensor, "batch vocab"]
) -> Float[Tensor, " batch"]:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` per row; terms with ``p_v = 0`` are 0.

    Example:
        >>> import torch
        >>> p = torch.tensor([[0.5, 0.5, 0.0]]).log()
        >>> q = torch.tensor([[0.25, 0.25, 0.5]]).log()
        >>> kl_from_logprobs(p, q)                          # log 2
        tensor([0.6931])
    """
    p = p_logprobs.exp()
    terms = torch.where(p > 0, p * (p_logprobs - q_logprobs), torch.zeros_like(p))
    return terms.sum(-1)


class NextTokenKL(LogitMetric):
    """KL divergence of the next-token distribution at the last prompt position.

    ``reference_logprobs`` are the reference (usually base) model's next-token
    log-probs (raw logits are fine too: they are log-softmaxed once here), one row
    per prompt of the batch the metric will score. ``direction="ref_to_model"``
    gives ``KL(reference || model)``; ``"model_to_ref"`` gives ``KL(model || reference)``.
    :meth:`select_rows` re-indexes the reference for a sub-batch or a repeated batch.

    Example:
        >>> import torch
        >>> ref = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
        >>> metric = NextTokenKL(ref)
        >>> metric.continuations(None)
        [[]]
        >>> metric([ref[:, None]])                          # zero against itself
        tensor([0., 0.])
    """

    name = "next_token_kl"

    def __init__(
        self,
        reference_logprobs: Float[Tensor, "batch vocab"],
        *,
        direction: KLDirection = "ref_to_model",
        name: str | None = None,
    ) -> None:
        if direction not in ("ref_to_model", "model_to_ref"):
            raise ValueError(
                f"unknown direction {direction!r}; choose 'ref_to_model' (KL(ref || model)) "
                "or 'model_to_ref' (KL(model || ref))"
            )
        ref = reference_logprobs.detach()
        ref = ref.to(_compute_dtype(ref))
        # log-probs are kept bit for bit: a second log-softmax shifts them by a rounding
        # error (~1 ulp of log(vocab)), and KL(p || p) would come out ~5e-7, not 0
        normalized = ref.numel() > 0 and bool((ref.logsumexp(-1).abs() < 1e-5).all())
        self.reference_logprobs = ref if normalized else ref.log_softmax(-1)
        self.direction = direction
        if name is not None:
            self.name = name

    def continuations(self, tokenizer: Any) -> list[list[int]]:
        return [[]]

    def select_rows(self, index: Int[Tensor, " rows"] | Sequence[int]) -> NextTokenKL:
        """The same metric with reference rows ``reference_logprobs[index]``."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.reference_logprobs.device)
        return NextTokenKL(self.reference_logprobs[index], direction=self.direction, name=self.name)

    def __call__(
        self, logits: Sequence[Float[Tensor, "batch _n vocab"]]
    ) -> Float[Tensor, " batch"]:
        (block,) = _check_logits(logits, [1], self.name)
        ref = self.reference_logprobs
        if block.shape[0] != ref.shape[0] or block.shape[-1] != ref.shape[-1]:
            raise ValueError(
                f"{self.name}: the logits have {block.shape[0]} rows over a vocabulary of "
                f"{block.shape[-1]}, the reference has {ref.shape[0]} rows over "
                f"{ref.shape[-1]}; give one reference row per prompt, in batch order "
                "(select_rows(index) re-indexes it)"
            )
        model = block[:, 0].to(_compute_dtype(block)).log_softmax(-1)
        ref = ref.to(device=model.device, dtype=torch.promote_types(ref.dtype, model.dtype))
        if self.direction == "ref_to_model":
            return kl_from_logprobs(ref, model)
        return kl_from_logprobs(model, ref)


def recovery_fraction(
    patched: Float[Tensor, "..."] | float | int,
    finetuned: Float[Tensor, "..."] | float | int,
    base: Float[Tensor, "..."] | float | int,
    *,
    eps: float = 1e-8,
) -> Float[Tensor, "..."]:
    """How far a patch moves a metric from the finetuned value back to the base value.

    ``(patched - finetuned) / (base - finetuned)``, elementwise with broadcasting: 0 means
    the patch changed nothing, 1 means it fully restored the base behaviour (values
    outside [0, 1] overshoot). Where ``|base - finetuned| < eps`` the fraction is
    undefined and the result is NaN (never inf); use ``torch.nanmean`` to average.

    Example:
        >>> import torch
        >>> recovery_fraction(torch.tensor([2.0, 3.0, 5.0]), torch.tensor([1.0, 1.0, 5.0]), 5.0)
        tensor([0.2500, 0.5000,    nan])
    """
    given = (patched, finetuned, base)
    device = next((x.device for x in given if isinstance(x, Tensor)), torch.device("cpu"))
    p, f, b = (torch.as_tensor(x, device=device) for x in given)
    dtype = torch.promote_types(torch.promote_types(p.dtype, f.dtype), b.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    p, f, b = (x.to(dtype) for x in (p, f, b))
    gap = b - f
    defined = gap.abs() >= eps
    safe_gap = torch.where(defined, gap, torch.ones_like(gap))
    return torch.where(defined, (p - f) / safe_gap, torch.full_like(gap, math.nan))


def _model_device(model: Any) -> torch.device:
    with contextlib.suppress(StopIteration):
        return next(model.parameters()).device
    return torch.device(getattr(model.cfg, "device", "cpu"))


def continuation_inputs(
    batch: ChatBatch, continuation: Sequence[int], device: Any
) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """(input_ids, attention_mask, position_ids) of ``batch`` with ``continuation`` appended
    to every row (mask ones, positions continuing from each row's last position)."""
    input_ids = batch.input_ids.to(device)
    attention_mask = batch.attention_mask.to(device)
    position_ids = batch.position_ids.to(device)
    if continuation:
        rows, n = input_ids.shape[0], len(continuation)
        extra = torch.tensor(list(continuation), dtype=torch.long, device=device).expand(rows, n)
        input_ids = torch.cat([input_ids, extra], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(rows, n)], dim=1)
        steps = torch.arange(1, n + 1, device=device)
        position_ids = torch.cat([position_ids, position_ids[:, -1:] + steps], dim=1)
    return input_ids, attention_mask, position_ids


def _continuation_logits(
    model: Any, batch: ChatBatch, continuation: Sequence[int], n_read: int
) -> Tensor:
    """Logits that predict ``continuation`` (or the next token) for every row."""
    input_ids, attention_mask, position_ids = continuation_inputs(
        batch, continuation, _model_device(model)
    )
    # the last len(continuation) + 1 positions; the very last predicts nothing read
    logits = last_logits(
        model, input_ids, attention_mask=attention_mask, position_ids=position_ids,
        last=len(continuation) + 1,
    )  # fmt: skip
    read = logits[:, : max(len(continuation), 1)]
    if read.shape[1] != n_read:
        raise ValueError(
            f"the metric says it reads {n_read} position(s) of continuation "
            f"{list(continuation)} but that continuation predicts {read.shape[1]}"
        )
    return read


def next_token_logprobs(model: Any, batch: ChatBatch) -> Float[Tensor, "batch vocab"]:
    """``model``'s next-token log-probs after every prompt of a left-padded ``batch``
    (the reference of :class:`NextTokenKL`: ``NextTokenKL(next_token_logprobs(base, batch))``)."""
    if batch.align != "left":
        raise ValueError(
            "next_token_logprobs needs a left-padded batch: batch_spans(..., align='left')"
        )
    with torch.no_grad():
        logits = _continuation_logits(model, batch, [], 1)[:, 0]
    return logits.to(_compute_dtype(logits)).log_softmax(-1)


def metric_on_model(
    model: Any,
    batch: ChatBatch,
    metric: LogitMetric,
    *,
    fwd_hooks: Sequence[tuple[Any, Any]] = (),
) -> Float[Tensor, " batch"]:
    """Evaluate a logit metric the slow, obvious way: one full forward per continuation.

    Every continuation is appended to every row of the left-padded ``batch`` (attention
    mask ones, positions continuing), the model runs on the whole sequence (under
    ``model.hooks(fwd_hooks=...)`` when hooks are given, without gradients), and the
    logits that predict the continuation's tokens go to the metric. The reference for
    faster engines.

    Example:
        >>> from piggyback_interp.core.models import chat_tokenizer
        >>> from piggyback_interp.core.spans import batch_spans
        >>> from piggyback_interp.testing import tiny_model
        >>> model = tiny_model("llama")
        >>> batch = batch_spans(chat_tokenizer(model), ["Hi", "Tell me a joke."])
        >>> metric_on_model(model, batch, TargetLogProb("I have no idea")).shape
        torch.Size([2])
    """
    if batch.align != "left":
        raise ValueError(
            f"metric_on_model needs a left-padded batch (align='left'), got "
            f"align={batch.align!r}: it is the plain reference computation, defined on "
            "ordinary left padding (each row one contiguous prompt after its padding, "
            "continuations appended after the last column) so that it stays independent "
            "of the prefix-aligned layout fast engines use. Build the batch with "
            "batch_spans(..., align='left')"
        )
    if not bool(batch.attention_mask[:, -1].all()):
        raise ValueError(
            "some rows of the batch end in padding; metric_on_model needs every row to end "
            "at its last prompt token (left padding, as batch_spans(..., align='left') makes)"
        )
    from piggyback_interp.core.models import chat_tokenizer

    tokenizer = chat_tokenizer(model)
    continuations = metric.continuations(tokenizer)
    n_read = metric.n_read(tokenizer)
    if len(n_read) != len(continuations):
        raise ValueError(
            f"{metric.name}: n_read gives {len(n_read)} counts for {len(continuations)} "
            "continuations"
        )
    hooks = model.hooks(fwd_hooks=list(fwd_hooks)) if fwd_hooks else contextlib.nullcontext()
    with torch.no_grad(), hooks:
        logits = [
            _continuation_logits(model, batch, cont, n)
            for cont, n in zip(continuations, n_read, strict=True)
        ]
    return metric(logits)
