"""What defines a finetuning run: :class:`FinetuneConfig`, its option enums, and :class:`FinetuneResult`.

Each string option is an enum (:class:`Method`, :class:`Export`, :class:`Precision`,
:class:`PostfixReference`; ``Region`` and ``Variant`` live with TReFT in
:mod:`~piggyback_interp.training.treft`), validated once when the config is built.

Example:
    >>> FinetuneConfig(method="treft").method is Method.TREFT
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from piggyback_interp.core.checks import Choice, at_least, choices, non_negative, positive
from piggyback_interp.core.errors import UserError
from piggyback_interp.training.lora import DEFAULT_TARGETS
from piggyback_interp.training.treft import Region, Variant


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


__all__ = [
    "METHODS",
    "Export",
    "FinetuneConfig",
    "FinetuneResult",
    "Method",
    "PostfixReference",
    "Precision",
]
