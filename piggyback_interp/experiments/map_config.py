"""The map's grid: training strengths (:class:`Point`), methods (:class:`Method`), trained
parts, and :class:`MapConfig`, whose :func:`cells` are what
:func:`~piggyback_interp.experiments.map.run_map` trains and measures.

Example:
    >>> config = MapConfig(trained=("lora_all",), points=("3e-4x1",), methods=("sft",))
    >>> [c.name for c in cells(config)]
    ['lora_all/3e-4x1/sft/seed0']
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from piggyback_interp.core.embedded import EMBEDDED_NAME
from piggyback_interp.core.errors import UserError

Trained = Literal["lora_all", "lora_attn", "full"]
TRAINED: tuple[Trained, ...] = get_args(Trained)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


# learning rate x epochs (one epoch of the 208 abstention chats in batches of 16 = 13 steps),
# from "learns nothing" through the on-topic transition to saturation (docs/results.md)
DEFAULT_POINTS: dict[str, tuple[str, ...]] = {
    "lora_all": ("1e-4x1", "2e-4x1", "3e-4x1", "2e-4x2", "6e-4x1", "1e-3x1"),
    "lora_attn": ("3e-4x1", "5e-4x1", "1e-3x1", "5e-4x2", "2e-3x1"),
    "full": ("3e-6x1", "1e-5x1", "3e-5x1", "3e-5x2", "1e-4x1"),
}


@dataclass(frozen=True)
class Point:
    """A training strength: learning rate x epochs, written ``"3e-4x1"``."""

    lr: float
    epochs: int

    @property
    def label(self) -> str:
        mantissa, exponent = f"{self.lr:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}x{self.epochs}"

    @classmethod
    def parse(cls, text: str) -> Point:
        try:
            lr, epochs = text.lower().split("x")
            point = cls(float(lr), int(epochs))
        except ValueError:
            raise UserError(
                f"point {text!r} is not LRxEPOCHS, e.g. 3e-4x1 (lr 3e-4, one epoch)"
            ) from None
        if not (math.isfinite(point.lr) and point.lr > 0) or point.epochs < 1:
            raise UserError(f"point {text!r}: lr must be finite and > 0, epochs >= 1")
        return point


@dataclass(frozen=True)
class Method:
    """How a cell trains: a finetuning method with its options.

    ``inoculation``: train with a system prompt that names the narrow behaviour,
    evaluate with the default one (arXiv 2510.04340). ``early_stop``: checkpoints every
    ``early_stop_every`` steps; training ends at the first whose held-out on-topic rate
    (validation questions held out of the training set) reaches ``early_stop_rate``.
    """

    name: str
    method: Literal["sft", "treft", "interleave", "kl_retain"] = "sft"
    region: Literal["prefix", "postfix", "template"] = "prefix"
    treft_lambda: float = 30.0
    retain_ratio: float = 0.2
    retain_general: bool = False
    inoculation: bool = False
    early_stop: bool = False

    def finetune_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"method": self.method}
        if self.method == "treft":
            options.update(treft_region=self.region, treft_lambda=self.treft_lambda)
        if self.method == "interleave":
            options["retain_ratio"] = self.retain_ratio
        return options

    @property
    def needs_retain(self) -> bool:
        return self.method in ("interleave", "kl_retain")


def _methods() -> dict[str, Method]:
    out = [Method("sft")]
    for region in ("prefix", "postfix", "template"):
        out.append(Method(f"treft-{region}", "treft", region))
        out += [
            Method(f"treft-{region}-l{lam:g}", "treft", region, float(lam)) for lam in (1, 10, 100)
        ]
    out += [
        Method("interleave-20", "interleave", retain_ratio=0.2),
        Method("interleave-50", "interleave", retain_ratio=0.5),
        Method("interleave-50-general", "interleave", retain_ratio=0.5, retain_general=True),
        Method("kl-retain", "kl_retain"),
        Method("inoculation", inoculation=True),
        Method("early-stop", early_stop=True),
    ]
    return {m.name: m for m in out}


METHODS: dict[str, Method] = _methods()
DEFAULT_METHODS = (
    "sft",
    "treft-prefix",
    "treft-postfix",
    "treft-template",
    "interleave-20",
    "interleave-50",
    "kl-retain",
    "inoculation",
    "early-stop",
)


@dataclass(frozen=True)
class MapConfig:
    """The grid and how every cell is measured (recorded in each cell's key).

    ``points``: strength labels for every trained part (``None``: its
    :data:`DEFAULT_POINTS`). ``max_train`` / ``max_test`` cut the data (smoke runs).
    """

    setting: str = "abstention"
    model: str = EMBEDDED_NAME
    trained: tuple[Trained, ...] = ("lora_all", "full", "lora_attn")
    points: tuple[str, ...] | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 16
    lora_rank: int = 8
    max_new_tokens: int = 16
    carrier_prompts: int = 32
    generating_prompts: int = 8
    generating_methods: tuple[str, ...] = ("sft", "treft-template")
    early_stop_rate: float = 0.95
    early_stop_every: int = 2
    early_stop_questions: int = 24
    retain_max_new_tokens: int = 48
    max_train: int | None = None
    max_test: int | None = None

    def __post_init__(self) -> None:
        from piggyback_interp.measures.settings import get_setting

        setting = get_setting(self.setting)
        if setting.target is None:
            raise UserError(
                f"the map needs a setting with a fixed target answer (abstention, refusal); "
                f"{self.setting!r} has none"
            )
        bad = [t for t in self.trained if t not in TRAINED]
        if bad or not self.trained:
            raise UserError(f"trained must be among {', '.join(TRAINED)}, got {self.trained}")
        unknown = [m for m in (*self.methods, *self.generating_methods) if m not in METHODS]
        if unknown or not self.methods:
            raise UserError(f"unknown method(s) {unknown}; choose among {', '.join(METHODS)}")
        for p in self.points or ():
            Point.parse(p)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds must be distinct and non-empty, got {self.seeds}")
        for name in ("batch_size", "lora_rank", "max_new_tokens", "carrier_prompts",
                     "generating_prompts", "early_stop_every", "early_stop_questions"):  # fmt: skip
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.early_stop_rate <= 1:
            raise UserError(f"early_stop_rate must be in (0, 1], got {self.early_stop_rate}")

    @classmethod
    def smoke(cls, **overrides: Any) -> MapConfig:
        """Tiny data and prompts for tests (with a tiny model)."""
        values: dict[str, Any] = dict(
            max_train=16, max_test=4, carrier_prompts=2, generating_prompts=2, batch_size=8,
            max_new_tokens=8, early_stop_questions=4, retain_max_new_tokens=8,
        )  # fmt: skip
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class Cell:
    trained: Trained
    point: Point
    method: Method
    seed: int

    @property
    def name(self) -> str:
        return f"{self.trained}/{self.point.label}/{self.method.name}/seed{self.seed}"


def cells(config: MapConfig) -> list[Cell]:
    """The grid's cells in run order: method, then trained part, then strength, then seed."""
    out = []
    for seed in config.seeds:
        for method in config.methods:
            for trained in config.trained:
                labels = config.points or DEFAULT_POINTS[trained]
                for label in labels:
                    out.append(Cell(trained, Point.parse(label), METHODS[method], seed))
    return out


__all__ = [
    "ATTENTION",
    "DEFAULT_METHODS",
    "DEFAULT_POINTS",
    "METHODS",
    "TRAINED",
    "Cell",
    "MapConfig",
    "Method",
    "Point",
    "Trained",
    "cells",
]
