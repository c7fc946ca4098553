"""argparse types shared by the `discache` subcommands: each refuses a bad value with one line
naming what it accepts (argparse prefixes the option's name)."""
from __future__ import annotations

import argparse
from typing import Callable, Sequence


def _number(text: str, kind: type, words: str) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}") from None


def positive_int(text: str) -> int:
    """A whole number of 1 or more."""
    value = int(_number(text, int, "a whole number of 1 or more"))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}")
    return value


def natural(text: str) -> int:
    """A whole number of 0 or more."""
    value = int(_number(text, int, "a whole number of 0 or more"))
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of 0 or more, got {text!r}")
    return value


def integer(text: str) -> int:
    """Any whole number."""
    return int(_number(text, int, "a whole number"))


def fraction(text: str) -> float:
    """A number from 0 to 1."""
    value = _number(text, float, "a number from 0 to 1")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def seconds(text: str) -> float:
    """A duration in seconds, more than 0."""
    value = _number(text, float, "a number of seconds above 0")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def port(text: str) -> int:
    """A TCP port from 0 (any free one) to 65535."""
    words = "a TCP port from 1 to 65535 (0: any free port)"
    value = int(_number(text, int, words))
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}")
    return value


def power_of_two(low: int, high: int) -> Callable[[str], int]:
    """A power of two from low to high."""
    words = f"a power of two from {low} to {high}"

    def check(text: str) -> int:
        value = int(_number(text, int, words))
        if not low <= value <= high or value & (value - 1):
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}")
        return value

    return check


def one_of(names: Sequence[str]) -> Callable[[str], str]:
    """One of names (argparse's own choices message differs between Python versions)."""
    def check(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(names)}, got {text!r}")
        return text

    return check


def some_of(names: Sequence[str]) -> Callable[[str], list[str]]:
    """A comma-separated list of names, at least one."""
    def check(text: str) -> list[str]:
        chosen = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in names]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(names)}, got {text!r}")
        return chosen

    return check
