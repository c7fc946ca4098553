"""argparse types shared by the `discache` subcommands."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An int > 0, or argparse's error."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value
