"""Checks of the config dataclasses: one :class:`~piggyback_interp.core.errors.UserError`
naming the field, the rule and the value; :class:`Choice`, the base of the string options.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Config:
    ...     lr: float = 1e-3
    ...     epochs: int = 1
    >>> positive(Config(lr=float("nan")), "lr")
    Traceback (most recent call last):
    ...
    piggyback_interp.core.errors.UserError: lr must be a finite number > 0, got nan
    >>> class Colour(Choice):
    ...     RED = "red"
    ...     BLUE = "blue"
    >>> Colour.parse("red", "colour") is Colour.RED, Colour.RED == "red", f"{Colour.BLUE}"
    (True, True, 'blue')
    >>> Colour.parse("green", "colour")
    Traceback (most recent call last):
    ...
    piggyback_interp.core.errors.UserError: colour must be one of red, blue, got 'green'
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, TypeVar

from piggyback_interp.core.errors import UserError

C = TypeVar("C", bound="Choice")


class Choice(str, Enum):
    """The values of a string option (``enum.StrEnum`` on Python 3.10 too).

    A member is a ``str``: it equals, hashes, prints, formats and serialises (``json``,
    ``dataclasses.asdict``) as its value, so a config given ``"sft"`` or ``Method.SFT``
    is the same config, and saved configs keep their plain strings.
    """

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)

    @classmethod
    def parse(cls: type[C], value: Any, name: str) -> C:
        """``value`` (a member or its string) as a member; a :class:`UserError` naming
        ``name`` and the valid choices otherwise."""
        try:
            return cls(value)
        except (ValueError, TypeError):
            raise UserError(
                f"{name} must be one of {', '.join(cls.values())}, got {value!r}"
            ) from None


def choices(config: object, **fields: type[Choice]) -> None:
    """Normalise each string option ``name=ChoiceType`` of ``config`` (frozen or not) to its
    member, once, in ``__post_init__``; a :class:`UserError` lists the valid choices."""
    for name, kind in fields.items():
        object.__setattr__(config, name, kind.parse(getattr(config, name), name))


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


def require_positive(**values: int) -> None:
    """Raise ``ValueError`` naming each of ``values`` that is not an int of 1 or more."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer (1 or more), got {value!r}")
