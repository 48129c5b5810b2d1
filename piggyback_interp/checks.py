"""Range checks of the config dataclasses: one :class:`~piggyback_interp.errors.UserError`
naming the field, the rule and the value.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Config:
    ...     lr: float = 1e-3
    ...     epochs: int = 1
    >>> positive(Config(lr=float("nan")), "lr")
    Traceback (most recent call last):
    ...
    piggyback_interp.errors.UserError: lr must be a finite number > 0, got nan
"""

from __future__ import annotations

import math

from piggyback_interp.errors import UserError


def at_least(config: object, minimum: int, *names: str) -> None:
    """Each field ``names`` of ``config`` is ``None`` or an integer ``>= minimum``."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not value >= minimum:
            raise UserError(f"{name} must be >= {minimum}, got {value!r}")


def positive(config: object, *names: str) -> None:
    """Each field ``names`` of ``config`` is a finite number ``> 0``."""
    for name in names:
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{name} must be a finite number > 0, got {value!r}")


def non_negative(config: object, *names: str) -> None:
    """Each field ``names`` of ``config`` is a finite number ``>= 0``."""
    for name in names:
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"{name} must be a finite number >= 0, got {value!r}")
