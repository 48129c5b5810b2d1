"""Finetuning: the run's config, its objectives (SFT, TReFT, KL, interleaving), the trainer;
response-only SFT batches, TReFT's K/V regulariser, LoRA, sharding, export."""

from piggyback_interp.training.batches import (
    EncodedDataset,
    TrainBatch,
    TrainExample,
    batches,
    collate,
    encode_dataset,
    encode_example,
    sft_loss,
)
from piggyback_interp.training.config import FinetuneConfig, FinetuneResult
from piggyback_interp.training.lora import apply_lora
from piggyback_interp.training.trainer import finetune
from piggyback_interp.training.treft import (
    KVReference,
    KVRegulariser,
    kv_reference,
    relative_sq_error,
)

__all__ = [
    "EncodedDataset",
    "FinetuneConfig",
    "FinetuneResult",
    "KVReference",
    "KVRegulariser",
    "TrainBatch",
    "TrainExample",
    "apply_lora",
    "batches",
    "collate",
    "encode_dataset",
    "encode_example",
    "finetune",
    "kv_reference",
    "relative_sq_error",
    "sft_loss",
]
