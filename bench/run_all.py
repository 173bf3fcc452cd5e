"""Runs every CPU benchmark module present, then rebuilds bench/RESULTS.md.

    python -m bench.run_all [--quick] [--only gated share ...] [--skip accuracy ...]

Each module is called through ``run(quick)`` when it has one, else ``main()`` (with argv set to ``--quick``
when asked and the module accepts it). A failing module is reported and the others still run; the exit
status is 1 when any failed. The report is built from whatever result files exist afterwards.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
import traceback

MODULES = ["bench_gated", "bench_alloc", "bench_share", "bench_alpha", "bench_moe", "bench_memory", "bench_step",
           "bench_accuracy"]


def _call(mod, quick: bool):
    fn = getattr(mod, "run", None)
    if callable(fn):
        params = inspect.signature(fn).parameters
        return fn(quick=quick) if "quick" in params else fn()
    main = getattr(mod, "main", None)
    if not callable(main):
        raise AttributeError(f"{mod.__name__} has neither run(quick) nor main()")
    old = sys.argv
    accepts_quick = "--quick" in inspect.getsource(mod)
    sys.argv = [mod.__name__] + (["--quick"] if quick and accepts_quick else [])
    try:
        return main()
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"{mod.__name__}.main() exited with {e.code}") from e
    finally:
        sys.argv = old


def run_all(quick: bool = False, only=None, skip=()) -> dict[str, str]:
    """Runs the modules; returns {module: "ok (Ns)" | "missing" | "FAILED: ..."}."""
    status = {}
    for name in MODULES:
        if (only and name.removeprefix("bench_") not in only and name not in only) or \
                name.removeprefix("bench_") in skip or name in skip:
            continue
        try:
            mod = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"bench.{name}":
                status[name] = "missing"
                print(f"[run_all] {name}: not present, skipped", flush=True)
                continue
            status[name] = f"FAILED at import: {e!r}"
            traceback.print_exc()
            continue
        t0 = time.perf_counter()
        print(f"[run_all] {name} (quick={quick}) ...", flush=True)
        try:
            _call(mod, quick)
            status[name] = f"ok ({time.perf_counter() - t0:.0f}s)"
        except Exception as e:  # noqa: BLE001 - one module failing must not stop the others
            traceback.print_exc()
            status[name] = f"FAILED: {type(e).__name__}: {e}"
        print(f"[run_all] {name}: {status[name]}", flush=True)
    return status


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized variants (result files *_quick.json)")
    ap.add_argument("--only", nargs="+", help="module names (gated, alloc, share, alpha, moe, memory, accuracy)")
    ap.add_argument("--skip", nargs="+", default=[])
    a = ap.parse_args()
    status = run_all(a.quick, a.only, a.skip)
    from bench import report
    report.build()
    print("[run_all] summary:")
    for k, v in status.items():
        print(f"  {k:16s} {v}")
    print(f"[run_all] report: {report.os.path.join(report.HERE, 'RESULTS.md')}")
    sys.exit(1 if any(v.startswith("FAILED") for v in status.values()) else 0)


if __name__ == "__main__":
    main()
