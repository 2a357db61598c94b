"""argparse ``type=`` converters shared by the package's commands (``nequip-mtl-make-data``,
``nequip-mtl-make-xtb-data``, ``nequip-mtl-make-si-pair``, ``nequip-mtl-transfer-check``):
one message per rule, whichever command reads the option.

Standard library only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["fraction", "non_negative_int", "positive_float", "positive_int"]


def _argument(text: str, cast: Callable, noun: str, ok: Callable, rule: str):
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _argument(text, int, "an integer", lambda v: v >= 1, ">= 1")


def non_negative_int(text: str) -> int:
    return _argument(text, int, "an integer", lambda v: v >= 0, ">= 0")


def positive_float(text: str) -> float:
    return _argument(text, float, "a number", lambda v: v > 0, "> 0")


def fraction(text: str) -> float:
    return _argument(text, float, "a number", lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
