"""Statistics of the evaluation protocol (bench/bench_protocol.py), as small pure functions.

- ``mean_sd``: mean and sample standard deviation (n - 1) of per-seed results.
- ``paired_diff_ci``: mean of the per-seed differences method − reference, paired by seed (same seed ⇒ same
  data order and head init), with a two-sided Student-t confidence interval over seeds (n - 1 degrees of freedom).
- ``params_ratio`` / ``within``: the equal-budget check (active trainable parameters against the reference).
- ``plateau_step``: where a validation curve has flattened.
"""
from __future__ import annotations

import math
import statistics
from typing import NamedTuple


class PairedDiff(NamedTuple):
    mean: float
    lo: float
    hi: float
    n: int
    seeds: list[int]


def mean_sd(xs: list[float]) -> tuple[float, float | None]:
    """(mean, sample sd); sd is None for a single value."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("xs must hold at least one value")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (scipy)."""
    from scipy.stats import t
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return float(t.ppf(p, df))


def paired_diff_ci(method: dict[int, float], reference: dict[int, float], conf: float = 0.95) -> PairedDiff:
    """Mean difference method − reference over the seeds both have, with a ``conf`` t-interval.

    ``method`` / ``reference``: {seed: metric}. With one common seed the interval is (-inf, inf) around it:
    a single pair says nothing about the spread. Raises ValueError when no seed is shared.
    """
    if not 0.0 < conf < 1.0:
        raise ValueError(f"conf must be in (0, 1), got {conf}")
    seeds = sorted(set(method) & set(reference))
    if not seeds:
        raise ValueError("method and reference share no seed: a paired difference needs the same seeds")
    d = [float(method[s]) - float(reference[s]) for s in seeds]
    m = statistics.fmean(d)
    if len(d) < 2:
        return PairedDiff(m, -math.inf, math.inf, 1, seeds)
    half = t_quantile(0.5 + conf / 2, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return PairedDiff(m, m - half, m + half, len(d), seeds)


def params_ratio(params: int, reference: int) -> float:
    if reference <= 0:
        raise ValueError(f"reference parameter count must be positive, got {reference}")
    return params / reference


def within(ratio: float, tol: float = 0.02) -> bool:
    """True when ``ratio`` is 1 ± ``tol``."""
    return abs(ratio - 1.0) <= tol + 1e-12


def plateau_step(steps: list[int], values: list[float], tol: float = 0.01) -> int | None:
    """First step from which every later value stays within ``tol`` of the curve's best (higher is better):
    where the curve has flattened. None when its last value is more than ``tol`` below the best (still moving)."""
    if len(steps) != len(values) or not steps:
        raise ValueError("steps and values must be non-empty and of equal length")
    best = max(values)
    for i in range(len(values)):
        if all(v >= best - tol for v in values[i:]):
            return steps[i]
    return None
