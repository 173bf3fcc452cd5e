"""Argument parsing for ``lora-kernels train`` and the ``--model/--data`` form of ``lora-kernels alloc``.

Kept free of torch imports so ``lora-kernels --help`` stays fast; the work is in :mod:`python_api.app.train`.
Exit codes: 0 done, 2 bad input (one line naming the file, column or argument; nothing written in --out),
130 interrupted (a resumable checkpoint was written), 1 any other failure.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from .argtypes import fraction as _frac
from .argtypes import positive_float as _pos_float
from .argtypes import positive_int as _pos_int
from .argtypes import SEED_MAX
from .argtypes import seed as _seed

METHODS = ("lora", "adalora", "shaplora", "sharelora-a", "sharelora-b", "sharelora-ab", "moe-uniform", "alphalora")


def _model_data(p: argparse.ArgumentParser, required: bool):
    p.add_argument("--model", required=required, help="local Hugging Face model directory, a .gguf file, or a "
                                                       "bundled name: minilm, smollm2")
    p.add_argument("--data", required=required, help="training data: .csv, .tsv, .jsonl, .parquet, .txt or a "
                                                     "datasets save_to_disk directory")
    p.add_argument("--task", choices=("classify", "causal-lm"), default=None,
                   help="default: classify when the data has a label column, else causal-lm")
    p.add_argument("--text-column", default=None, help="default: text / sentence / content / review / document")
    p.add_argument("--label-column", default=None, help="default: label / labels when present")
    p.add_argument("--eval-data", default=None, help="held-out test data (default: cut from --data)")
    p.add_argument("--targets", nargs="+", default=None,
                   help="module names or suffixes to adapt (default: every Linear inside the blocks)")
    p.add_argument("--r", type=_pos_int, default=8, help="LoRA rank; target rank per module for adalora/shaplora")
    p.add_argument("--r-init", type=_pos_int, default=None,
                   help="initial rank of adalora / the shaplora super-net (default 12)")
    p.add_argument("--budget", type=_pos_int, default=None,
                   help="total rank over modules (adalora, shaplora; default r × modules) or total experts "
                        "(moe-uniform, alphalora; default 2 × blocks); with --budget-unit params: trainable "
                        "parameters (default: uniform LoRA's at --r)")
    p.add_argument("--budget-unit", choices=("ranks", "params"), default="ranks",
                   help="adalora / shaplora: --budget counts ranks (default) or the trainable parameters the kept "
                        "ranks add (modules differ in in + out, so equal ranks are not equal parameters)")
    p.add_argument("--lr", type=_pos_float, default=None, help="AdamW learning rate, linear decay "
                                                              "(default 1e-3 classify, 2e-4 causal-lm)")
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="clip the gradient norm before each step (transformers.Trainer's default 1.0; 0: off)")
    p.add_argument("--batch-size", type=_pos_int, default=None, help="default 16 classify, 8 causal-lm")
    p.add_argument("--max-length", type=_pos_int, default=None, help="tokens per text; longer texts are truncated "
                                                                    "and counted (default 128 classify, 256 causal-lm)")
    p.add_argument("--seed", type=_seed, default=0, help=f"random seed, 0 to {SEED_MAX} (default 0)")
    p.add_argument("--bf16", action="store_true", help="bf16 base weights and autocast (adapters stay fp32)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in backward (less memory, about 1/3 more time)")
    p.add_argument("--val-frac", type=_frac, default=0.1, help="validation fraction cut from --data")
    p.add_argument("--test-frac", type=_frac, default=0.1, help="test fraction cut from --data (no --eval-data)")
    p.add_argument("--expert-r", type=_pos_int, default=None, help="rank of each MoE expert (default r // 2)")
    p.add_argument("--beta", type=_pos_float, default=None, help="AlphaLoRA exponent (default 2.5)")
    p.add_argument("--threads", type=_pos_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-supernet-check", action="store_true",
                   help="shaplora: score the super-network even if its validation loss did not fall 5%% (not advised)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out that is not ours / restart a run")


def add_train_parser(sub) -> argparse.ArgumentParser:
    t = sub.add_parser("train", help="fine-tune your own local model on your own data (offline)")
    _model_data(t, required=True)
    t.add_argument("--method", required=True, choices=METHODS)
    t.add_argument("--retrain", choices=("plain", "warm"), default="plain",
                   help="shaplora: retrain plain LoRA with the rank pattern from a fresh init (plain, default) or "
                        "from the super-network's kept components, its head too (warm)")
    t.add_argument("--out", required=True, help="output directory (adapters, metrics.json, report.md, checkpoint)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--steps", type=_pos_int, default=None, help="optimizer steps (default: one epoch)")
    g.add_argument("--epochs", type=_pos_float, default=None, help="passes over the training split")
    t.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    t.add_argument("--merge", action="store_true", help="also write merged/: the full model with adapters folded in")
    t.add_argument("--save-every", type=_pos_int, default=50, help="checkpoint every N steps (and on Ctrl-C)")
    t.add_argument("--no-verify", action="store_true", help="skip reloading the written adapters to compare outputs")
    return t


def add_alloc_options(a: argparse.ArgumentParser) -> None:
    """``alloc --model M --data D``: the allocation of a BYO run, without the final training."""
    a.add_argument("--model", default=None, help="with --data: allocate on your own model (see `train --help`)")
    a.add_argument("--data", default=None, help="with --model: your own data")
    a.add_argument("--budget", type=_pos_int, default=None, help="total rank (shaplora/adalora) or experts (alphalora)")
    a.add_argument("--budget-unit", choices=("ranks", "params"), default="ranks",
                   help="shaplora / adalora: --budget in ranks or trainable parameters")
    a.add_argument("--text-column", default=None)
    a.add_argument("--label-column", default=None)
    a.add_argument("--task", choices=("classify", "causal-lm"), default=None)
    a.add_argument("--targets", nargs="+", default=None)
    a.add_argument("--lr", type=_pos_float, default=None)
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("--no-supernet-check", action="store_true",
                   help="shaplora: score the super-network even if its validation loss did not fall 5%% (not advised)")


def config_from_args(args, method: str | None = None, argv: list[str] | None = None):
    from .train import TrainConfig

    argv = sys.argv[1:] if argv is None else argv
    g = lambda k, d=None: getattr(args, k, d)  # noqa: E731
    return TrainConfig(
        model=args.model, data=args.data, method=method or args.method, out=args.out, task=g("task"),
        text_column=g("text_column"), label_column=g("label_column"), eval_data=g("eval_data"), targets=g("targets"),
        r=g("r") or 8, r_init=g("r_init") or 12, budget=g("budget"),
        budget_unit=g("budget_unit", "ranks"), retrain=g("retrain", "plain"), steps=g("steps"), epochs=g("epochs"),
        lr=g("lr"),
        max_grad_norm=g("max_grad_norm", 1.0),
        batch_size=g("batch_size"), max_length=g("max_length"), seed=g("seed", 0), bf16=bool(g("bf16", False)),
        grad_checkpointing=bool(g("grad_checkpointing", False)),
        resume=bool(g("resume", False)), overwrite=bool(g("overwrite", False)), merge=bool(g("merge", False)),
        verify=not g("no_verify", False), val_frac=g("val_frac", 0.1), test_frac=g("test_frac", 0.1),
        save_every=g("save_every", 50), expert_r=g("expert_r"), beta=g("beta") or 2.5, threads=g("threads"),
        progress=not g("no_progress", False), supernet_check=not g("no_supernet_check", False),
        command=shlex.join(["lora-kernels", *argv]))


# options by the methods that use them, per command: given to another method (or, "own" / "bundled", to the other
# kind of alloc run), they are refused rather than ignored
_TRAINED = ("adalora", "shaplora")
OWN, BUNDLED = "own", "bundled"   # alloc with --model / --data (your own) or without (the bundled MiniLM)
METHOD_OPTIONS = {"budget": ("adalora", "shaplora", "moe-uniform", "alphalora"), "r_init": _TRAINED,
                  "beta": ("alphalora",), "expert_r": ("moe-uniform", "alphalora"), "no_supernet_check": ("shaplora",)}
OWN_ALLOC_OPTIONS = {"steps": _TRAINED, "batch_size": _TRAINED, "max_length": _TRAINED, "lr": _TRAINED,
                     "r": _TRAINED, "r_init": _TRAINED, "no_supernet_check": ("shaplora",), "beta": ("alphalora",),
                     "experts_per_layer": BUNDLED, "min_experts": BUNDLED, "time_budget": BUNDLED, "quick": BUNDLED}
BUNDLED_ALLOC_OPTIONS = {"steps": _TRAINED, "batch_size": _TRAINED, "max_length": _TRAINED, "time_budget": _TRAINED,
                         "r": _TRAINED, "r_init": _TRAINED, "experts_per_layer": ("alphalora",), "beta": ("alphalora",),
                         "min_experts": ("alphalora",), "budget": OWN, "budget_unit": OWN, "text_column": OWN,
                         "label_column": OWN, "task": OWN, "targets": OWN, "lr": OWN, "overwrite": OWN,
                         "no_supernet_check": OWN}
_PARSER_DEFAULTS = {"budget_unit": "ranks"}   # options whose parser default is not None


def refuse_unused(args, table: dict, method: str) -> None:
    """Refuses an option ``table`` says ``method`` does not use (a --budget with lora would otherwise be ignored)."""
    from .byo_data import BadInput

    for opt, users in table.items():
        value = getattr(args, opt, None)
        if value is None or value is False or (opt in _PARSER_DEFAULTS and value == _PARSER_DEFAULTS[opt]):
            continue   # not given (a 0, e.g. --min-experts 0, is given)
        flag = "--" + opt.replace("_", "-")
        if users == OWN:
            raise BadInput(f"{flag}: used only by alloc on your own model (with --model and --data)")
        if users == BUNDLED:
            raise BadInput(f"{flag}: used only by the bundled alloc (without --model / --data)")
        if method not in users:
            raise BadInput(f"{flag}: used only by {', '.join(users)}, not {method}")


def _guarded(fn, args, prog: str) -> int:
    from .byo_data import BadInput
    from .train import Interrupted

    try:
        fn()
    except BadInput as e:
        sys.stderr.write(f"{prog}: error: {str(e).splitlines()[0]}\n")
        return 2
    except Interrupted as e:
        sys.stderr.write(f"{prog}: {e}\n")
        return 130
    return 0


def cmd_train(args, argv: list[str] | None = None) -> int:
    from .train import run

    cfg = config_from_args(args, argv=argv)
    def train():
        refuse_unused(args, METHOD_OPTIONS, args.method)
        run(cfg)
    return _guarded(train, args, "lora-kernels train")


def cmd_alloc(args, argv: list[str] | None = None) -> int:
    from .train import run_alloc

    if args.model is None or args.data is None:
        sys.stderr.write("lora-kernels alloc: error: --model and --data go together\n")
        return 2
    cfg = config_from_args(args, method=args.method, argv=argv)

    def alloc():
        refuse_unused(args, OWN_ALLOC_OPTIONS, args.method)
        run_alloc(cfg)
    return _guarded(alloc, args, "lora-kernels alloc")
