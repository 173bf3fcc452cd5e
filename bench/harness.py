"""Benchmark harness: side-by-side timing in one process and the one result schema (PERFORMANCE.md).

    stats = measure({"ours": f, "peft": g}, warmup=3, repeats=10, threads=2)
    rows = [row("lora_fwd", p, "fwd", (T, K, N, R), torch.float32, "cpu", s) for p, s in stats.items()]
    write_rows(rows, "bench/results/x.json")

Providers are interleaved within every repeat (and their order rotated) so drift in clock speed or load
hits all of them alike; report ratios between providers of one ``measure`` call, not bare times.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import time
from typing import Any, Callable

import torch

SCHEMA = ("op", "provider", "mode", "shape", "dtype", "device", "median", "p20", "p80", "unit", "version",
          "commit", "date")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(root: str = ROOT) -> str:
    """HEAD's commit read from .git (no git process), or "unknown"."""
    try:
        head = open(os.path.join(root, ".git", "HEAD")).read().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(None, 1)[1]
        path = os.path.join(root, ".git", ref)
        if os.path.exists(path):
            return open(path).read().strip()
        for line in open(os.path.join(root, ".git", "packed-refs")):
            if line.strip().endswith(ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure(fns: dict[str, Callable] | Callable, warmup: int = 3, repeats: int = 10,
            setup: dict[str, Callable] | Callable | None = None, threads: int | None = None,
            scale: float = 1e3) -> dict[str, dict[str, float]]:
    """Times each provider ``repeats`` times after ``warmup`` rounds, interleaved.

    ``setup`` (one callable, or one per provider) runs untimed before each call and its result is passed
    to the provider's function (e.g. a forward pass before timing a backward). ``threads`` pins
    ``torch.set_num_threads`` for the measurement. Returns ``{provider: {"median", "p20", "p80"}}`` in ms
    (``scale`` = 1e3) per call.
    """
    if callable(fns):
        fns = {"": fns}
    names = list(fns)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        for it in range(warmup + repeats):
            k = it % len(names)
            for name in names[k:] + names[:k]:
                su = setup.get(name) if isinstance(setup, dict) else setup
                arg = su() if su is not None else None
                t0 = time.perf_counter()
                fns[name](arg) if su is not None else fns[name]()
                dt = time.perf_counter() - t0
                if it >= warmup:
                    times[name].append(dt * scale)
    finally:
        torch.set_num_threads(old_threads)
    return {n: {"median": statistics.median(t), "p20": _quantile(t, 0.2), "p80": _quantile(t, 0.8)}
            for n, t in times.items()}


def row(op: str, provider: str, mode: str, shape, dtype, device: str, stats: dict[str, float] | float,
        unit: str = "ms", **extra: Any) -> dict[str, Any]:
    """One result row in the shared schema; a bare number (a count, a byte size) fills median/p20/p80."""
    from lora_kernels import __version__
    if not isinstance(stats, dict):
        stats = {"median": stats, "p20": stats, "p80": stats}
    r = {"op": op, "provider": provider, "mode": mode, "shape": list(shape) if not isinstance(shape, str) else shape,
         "dtype": str(dtype).replace("torch.", ""), "device": device, "median": stats["median"], "p20": stats["p20"],
         "p80": stats["p80"], "unit": unit, "version": __version__, "commit": git_commit(),
         "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    r.update(extra)
    return r


def write_rows(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
