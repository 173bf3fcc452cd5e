"""Benchmark harness: side-by-side timing in one process and the one result schema (PERFORMANCE.md).

    threads = pin_threads()
    stats = measure({"ours": f, "peft": g}, warmup=3, repeats=10)
    rows = [make_row("lora_linear", p, "full", "T2048-d768-r8", torch.float32, "cpu", s) for p, s in stats.items()]
    write_results(rows, "gated_cpu", {"threads": threads})      # results_dir()/gated_cpu.{json,csv}

Providers are interleaved within every repeat (their order rotated) so drift in clock speed or machine load
hits all of them alike; report ratios between providers of one ``measure`` call, not bare times.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

SCHEMA = ("op", "provider", "mode", "shape", "dtype", "device", "median", "p20", "p80", "unit", "version",
          "commit", "date")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
RESULTS_ENV = "LORA_KERNELS_BENCH_RESULTS"


def results_dir() -> str:
    """Where result files go: $LORA_KERNELS_BENCH_RESULTS when set (``lora-kernels bench --out`` sets it, so an
    installed package never writes into site-packages), else the checkout's bench/results. Read at call time."""
    return os.environ.get(RESULTS_ENV) or RESULTS


class Stats(NamedTuple):
    median: float
    p20: float
    p80: float


def pin_threads(n: int | None = None) -> int:
    """``torch.set_num_threads`` to ``n`` (default: $BENCH_THREADS, else the core count); returns it."""
    n = n or int(os.environ.get("BENCH_THREADS") or 0) or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def git_commit(root: str = ROOT) -> str:
    """HEAD's short commit read from .git (no git process), or "unknown"."""
    try:
        with open(os.path.join(root, ".git", "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref:"):
            return head[:7]
        ref = head.split(None, 1)[1]
        path = os.path.join(root, ".git", ref)
        if os.path.exists(path):
            with open(path) as f:
                return f.read().strip()[:7]
        with open(os.path.join(root, ".git", "packed-refs")) as f:
            for line in f:
                if line.strip().endswith(ref):
                    return line.split()[0][:7]
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
            scale: float = 1e3) -> dict[str, Stats]:
    """Times each provider ``repeats`` times after ``warmup`` rounds, interleaved; ms per call (``scale``).

    ``setup`` (one callable, or a dict per provider) runs untimed before each call and its result is passed
    to the provider's function (e.g. a forward pass before timing a backward). ``threads`` pins
    ``torch.set_num_threads`` for this measurement only.
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
    return {n: Stats(statistics.median(t), _quantile(t, 0.2), _quantile(t, 0.8)) for n, t in times.items()}


def make_row(op: str, provider: str, mode: str, shape, dtype, device: str, stats, unit: str = "ms",
             **extra: Any) -> dict[str, Any]:
    """One row in the shared schema. ``stats``: (median, p20, p80), or one number (a count, a byte size)."""
    from lora_kernels import __version__
    if isinstance(stats, (int, float)):
        stats = (stats, stats, stats)
    med, p20, p80 = (round(v, 6) if isinstance(v, float) else v for v in stats)
    r = {"op": op, "provider": provider, "mode": mode, "shape": shape if isinstance(shape, str) else list(shape),
         "dtype": str(dtype).replace("torch.", ""), "device": device, "median": med, "p20": p20, "p80": p80,
         "unit": unit, "version": __version__, "commit": git_commit(),
         "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    r.update(extra)
    return r


row = make_row


def write_results(rows: list[dict], name: str, meta: dict | None = None, directory: str | None = None) -> str:
    """Writes ``<directory>/<name>.json`` ({"meta", "rows"}) and ``.csv`` (schema columns, then extras);
    ``directory`` defaults to ``results_dir()``."""
    directory = directory or results_dir()
    os.makedirs(directory, exist_ok=True)
    meta = {**(meta or {}), "torch": torch.__version__}
    path = os.path.join(directory, name + ".json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
        f.write("\n")
    extras = sorted({k for r in rows for k in r} - set(SCHEMA))
    with open(os.path.join(directory, name + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*SCHEMA, *extras])
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    return path


def format_table(rows: list[dict], cols=("op", "provider", "mode", "shape", "median", "unit")) -> str:
    """Plain-text table of ``cols`` for printing."""
    cells = [[str(c) for c in cols]] + [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def peak_alloc_bytes(fn: Callable[[], Any]) -> dict[str, int]:
    """CPU allocator bytes of one call of ``fn()``, from the profiler's memory events.

    Returns {"peak": the highest level reached above the level at entry (≥ 0), "end": the level at exit
    relative to entry}. Counts tensors from PyTorch's CPU allocator only, not oneDNN/BLAS scratch or Python
    objects. The profiler reports no free of a tensor allocated before the call (measured, torch 2.13), so a
    ``fn`` that frees older tensors (``zero_grad(set_to_none=True)``) reads high: free them before the call.
    """
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level, peak = 0, 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return {"peak": int(peak), "end": int(level)}
