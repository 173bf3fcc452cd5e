"""argparse value types shared by every ``lora-kernels`` command: a bad value is one line naming it (exit 2)."""
from __future__ import annotations

import argparse
import math


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):   # nan and inf are not learning rates or exponents
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {s!r}")
    return v


def fraction(s: str) -> float:
    v = positive_float(s)
    if v >= 0.5:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 0.5), got {s!r}")
    return v


SEED_MAX = 2 ** 32 - 1   # the dropout hash keeps a seed's low 32 bits: a larger seed would repeat a smaller one's run


def seed(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {SEED_MAX}, got {s!r}") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {SEED_MAX} (2**32 - 1), got {s!r}")
    return v
