"""The argument checks every public entry point shares: one message shape, naming the argument and what is
allowed, raised before any training or measuring starts.

Example::

    >>> check_rho(0.05)
    0.05
    >>> check_int(0, "k")
    Traceback (most recent call last):
    ...
    ValueError: `k` must be an int >= 1, got 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["check_choice", "check_flag", "check_int", "check_number", "check_rho"]


def check_number(value: Any, name: str, minimum: float | None = None, strict: bool = False) -> float:
    """``value`` as a float; it must be a finite real number (not a bool) and ``>= minimum`` (``>`` if
    ``strict``).

    Raises:
        ValueError: naming ``name`` and the allowed range.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"`{name}` must be a finite number{bound}, got {value!r}.")
    return float(value)


def check_rho(value: Any, name: str = "rho") -> float:
    """A perturbation radius: a finite number >= 0.

    Raises:
        ValueError: when ``value`` is negative, not finite or not a number.
    """
    return check_number(value, name, minimum=0)


def check_int(value: Any, name: str, least: int = 1) -> int:
    """An int (not a bool) ``>= least``.

    Raises:
        ValueError: naming ``name`` and the least value allowed.
    """
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
        raise ValueError(f"`{name}` must be an int >= {least}, got {value!r}.")
    return value


def check_flag(value: Any, name: str) -> bool:
    """``True`` or ``False``, nothing truthy.

    Raises:
        ValueError: naming ``name``.
    """
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """One of ``choices``.

    Raises:
        ValueError: listing the choices.
    """
    if not (isinstance(value, str) and value in choices):
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
    return value
