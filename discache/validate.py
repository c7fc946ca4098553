"""The one check of every size and every duration discache takes from its caller."""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Optional


def size(value: Any, name: str = "nbytes", maximum: Optional[int] = None, *,
         zero: bool = False) -> int:
    """value as a positive int, or >= 0 when zero=True (anything with __index__, numpy integers
    too; not bool)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, not a bool")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if n < 0 or (n == 0 and not zero):
        raise ValueError(f"{name} must be {'>= 0' if zero else 'positive'}, got {n}")
    if maximum is not None and n > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {n}")
    return n


def duration(value: Any, name: str, *, zero: bool = False) -> float:
    """value as a finite number of seconds, positive (or zero when zero=True)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of seconds, not a bool")
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if seconds < 0 or (seconds == 0 and not zero):
        raise ValueError(f"{name} must be {'>= 0' if zero else 'positive'} seconds, got {value!r}")
    return seconds
