"""Planted structure: do the allocators put the ranks where the truth is? (issue 16; free of accuracy noise)

A teacher is a frozen residual stack of ``layers`` linear maps (``h ← h + tanh(W_l h)``, width ``d``) plus known
low-rank deltas in a known subset of modules (e.g. ranks 4/2/1 in 3 of 12). The student is the same frozen base
with adapters on every module and learns the teacher's outputs on fresh N(0, I) inputs (per-example MSE, a plain
loss). At a total budget equal to the planted total rank:
- ShapLoRA (``shaplora_workflow``, SVD-form super-network at ``r_init``; variants = the ablations below),
- AdaLoRA (``AdaLoRAAllocator(budget=B)``, PEFT's schedule shape, orthogonality weight 0.5 = PEFT's default,
  trained for the super-network's + the retrain's steps, i.e. the same total steps as ShapLoRA),
- AlphaLoRA (experts per module from the layer alphas of the frozen base, one rank per expert, ``min_experts`` 0;
  data-free, so blind to the planted deltas),
- uniform LoRA at rank ceil(B / modules) on every module (>= the budget: generous to uniform),
- the oracle (plain LoRA with the planted pattern).
Measured: the exact-pattern hit (per-module counts equal the planted ones), "support" (every rank in a planted
module), and the teacher–student test loss after retraining the pattern in plain LoRA form from scratch (what a
PEFT user would run), relative to the untrained student's loss (1.0 = learned nothing).

ShapLoRA variants (``shaplora_workflow`` arguments; the user's loss is plain in all of them):
  trained          basis="trained", no orthogonality (the behaviour before issue 16)
  trained+orth     basis="trained", orth_reg=0.1 (the penalty's gradient added by hooks inside the workflow)
  orthparam        basis="trained", A and B under torch's orthogonal parametrisation (bench-only)
  merged           basis="merged" (score in the SVD basis of each module's merged update; the default)
  merged+orth      basis="merged", orth_reg=0.1
  merged+abs       basis="merged", by="abs"
  merged+lorainit  basis="merged", a super-network built with svd_init="lora" (LoRA's init: A kaiming, B = 0, λ = 1)
  merged+lorainit+split  the same, the two scorings on validation halves (split_validation=True)
The workflow's own SVD-form retrain is run for the default variant only (``svd_loss``); the other variants skip it
(their plain-LoRA retrain is measured the same way for all).
Run: ``python -m bench.bench_planted [--seeds 5] [--configs ...] [--variants ...]`` →
bench/results/planted_cpu.{json,md} (+ planted_cpu_runs.jsonl, one line per config × seed × method; a rerun skips the
lines already there, so partial runs resume).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings

import torch
from torch import nn

import python_api as lk
from bench.harness import git_commit, pin_threads, results_dir
from python_api.allocators.adalora import AdaLoRAAllocator, orthogonality_penalty
from python_api.allocators.shaplora import shaplora_workflow

RESULTS = results_dir()
# name -> width, number of modules, planted {module index: rank}, overrides of HP
CONFIGS = {
    "d32_L12_r421": {"d": 32, "layers": 12, "planted": {2: 4, 6: 2, 9: 1}},
    "d48_L8_r3311": {"d": 48, "layers": 8, "planted": {0: 3, 3: 3, 5: 1, 7: 1}},
    "d64_L16_r2222": {"d": 64, "layers": 16, "planted": {1: 2, 5: 2, 10: 2, 14: 2}},
    "d32_L6_r51": {"d": 32, "layers": 6, "planted": {1: 5, 4: 1}},
    # harder: a super-network trained a third as long; weaker deltas (singular values 0.3 … 0.15)
    "d32_L12_r421_sup100": {"d": 32, "layers": 12, "planted": {2: 4, 6: 2, 9: 1}, "hp": {"sup_steps": 100}},
    "d32_L12_r4321_weak": {"d": 32, "layers": 12, "planted": {1: 4, 4: 3, 7: 2, 10: 1}, "hp": {"sigma": 0.3}},
    # a super-network trained a tenth as long: where AdaLoRA's init (λ = 0, small A, B) has barely started
    "d32_L12_r421_sup30": {"d": 32, "layers": 12, "planted": {2: 4, 6: 2, 9: 1}, "hp": {"sup_steps": 30}},
}
VARIANTS = {
    "trained": {"basis": "trained"},
    "trained+orth": {"basis": "trained", "orth_reg": 0.1},
    "orthparam": {"basis": "trained", "orthparam": True},
    "merged": {"basis": "merged"},
    "merged+orth": {"basis": "merged", "orth_reg": 0.1},
    "merged+abs": {"basis": "merged", "by": "abs"},
    "merged+lorainit": {"basis": "merged", "svd_init": "lora"},
    "merged+lorainit+split": {"basis": "merged", "svd_init": "lora", "split_validation": True},
}
DEFAULT_VARIANT = "merged"
HP = {"r_init": 6, "batch": 128, "lr": 1e-2, "sup_steps": 300, "steps": 300, "n_val": 1024, "n_test": 4096,
      "sigma": 0.8, "adalora_orth": 0.5}


class Stack(nn.Module):
    def __init__(self, linears):
        super().__init__()
        self.layers = nn.ModuleList(linears)

    def forward(self, x):
        for lin in self.layers:
            x = x + torch.tanh(lin(x))
        return x


def make_task(cfg: dict, seed: int, hp: dict = HP) -> dict:
    """Base weights, planted deltas, validation and test sets of one (config, seed)."""
    d, n = cfg["d"], cfg["layers"]
    g = torch.Generator().manual_seed(1000 + seed)
    base = [(torch.randn(d, d, generator=g) / math.sqrt(d), 0.1 * torch.randn(d, generator=g)) for _ in range(n)]
    deltas = {}
    for i, k in cfg["planted"].items():
        u = torch.linalg.qr(torch.randn(d, k, generator=g))[0]
        v = torch.linalg.qr(torch.randn(d, k, generator=g))[0]
        s = hp["sigma"] * torch.linspace(1.0, 0.5, k) if k > 1 else torch.tensor([hp["sigma"]])
        deltas[i] = (u * s) @ v.T
    teacher = Stack([_linear(w + deltas.get(i, 0), b) for i, (w, b) in enumerate(base)]).requires_grad_(False)

    def data(m):
        x = torch.randn(m, d, generator=g)
        with torch.no_grad():
            return x, teacher(x)
    val, test = data(hp["n_val"]), data(hp["n_test"])
    return {"cfg": cfg, "base": base, "teacher": teacher, "val": [(val[0][i:i + 256], val[1][i:i + 256])
            for i in range(0, hp["n_val"], 256)], "test": test, "seed": seed}


def _linear(w, b):
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin.requires_grad_(False)


def student(task: dict, ranks: dict[int, int] | int, svd: bool, init_seed: int, orthparam: bool = False,
            svd_init: str = "adalora") -> Stack:
    """The frozen base with adapters: ``ranks`` = one rank for every module or {module: rank} (0 → no adapter)."""
    torch.manual_seed(init_seed)
    mods = []
    for i, (w, b) in enumerate(task["base"]):
        r = ranks if isinstance(ranks, int) else ranks.get(i, 0)
        lin = _linear(w, b)
        mods.append(lk.LoRALinear.from_linear(lin, r, alpha=r, svd=svd, svd_init=svd_init) if r > 0 else lin)
        if orthparam and r > 0:
            from torch.nn.utils.parametrizations import orthogonal
            orthogonal(mods[-1], "lora_A")
            orthogonal(mods[-1], "lora_B")
    return Stack(mods)


def mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean(1)


def fit(model, task, steps, seed, orth=0.0, allocator=None, hp=HP) -> float:
    """Adam on fresh inputs (a generator per (task seed, run seed): every method sees the same data order)."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(50_000 + 97 * task["seed"] + seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=hp["lr"])
    model.train()
    for step in range(steps):
        x = torch.randn(hp["batch"], task["cfg"]["d"], generator=g)
        with torch.no_grad():
            y = task["teacher"](x)
        loss = mse(model, (x, y)).mean()
        if orth:
            loss = loss + orth * orthogonality_penalty(model)
        loss.backward()
        opt.step()
        if allocator is not None:
            allocator.update_and_allocate(step)
        opt.zero_grad()
    return time.perf_counter() - t0


def test_loss(model, task) -> float:
    """Teacher–student MSE on the test inputs, relative to the untrained student's (the frozen base)."""
    model.eval()
    with torch.no_grad():
        x, y = task["test"]
        base = Stack([_linear(w, b) for w, b in task["base"]])
        return float(mse(model, (x, y)).mean() / mse(base, (x, y)).mean())


def counts_of(masks: dict[str, torch.Tensor]) -> dict[int, int]:
    """``layers.<i>`` masks → {module index: kept ranks}."""
    return {int(n.split(".")[-1]): int(m.sum()) for n, m in masks.items() if int(m.sum()) > 0}


def score(counts: dict[int, int], planted: dict[int, int]) -> dict:
    return {"exact": counts == planted, "support": set(counts) <= set(planted),
            "misplaced": sum(c for i, c in counts.items() if i not in planted)}


def retrain_plain(task, counts, seed, hp=HP) -> float:
    model = student(task, counts, svd=False, init_seed=seed)
    fit(model, task, hp["steps"], seed, hp=hp)
    return test_loss(model, task)


def run_shaplora(task, variant: str, seed: int, hp=HP) -> dict:
    spec = dict(VARIANTS[variant])
    orthparam = spec.pop("orthparam", False)
    svd_init = spec.pop("svd_init", "adalora")
    budget = sum(task["cfg"]["planted"].values())
    calls = {"sup": None}
    times = {"sup": 0.0, "retrain": 0.0}
    full = variant == DEFAULT_VARIANT

    def build():
        return student(task, hp["r_init"], svd=True, init_seed=seed, orthparam=orthparam, svd_init=svd_init)

    def train(model):
        if calls["sup"] is None or calls["sup"] is model:
            calls["sup"] = model
            times["sup"] += fit(model, task, hp["sup_steps"], seed, hp=hp)
        elif full:
            times["retrain"] += fit(model, task, hp["steps"], seed, hp=hp)

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = shaplora_workflow(build, train, task["val"], lambda m: test_loss(m, task) if full else None,
                                loss_fn=mse, budget=budget, seed=seed, retrain="svd", **spec)
    wall = time.perf_counter() - t0
    counts = counts_of(out["masks"])
    return {"counts": counts, **score(counts, task["cfg"]["planted"]), "loss": retrain_plain(task, counts, seed, hp),
            "svd_loss": out["result"], "stability": out["score_stability"],
            "supernet_rel_loss": out["supernet"]["val_loss"] / out["supernet"]["val_loss_untrained"],
            "extra_train_calls": out["supernet"]["extra_train_calls"],
            "warnings": [str(w.message)[:160] for w in caught],
            "supernet_s": times["sup"], "alloc_s": wall - times["sup"] - times["retrain"]}


def run_adalora(task, seed, hp=HP) -> dict:
    budget = sum(task["cfg"]["planted"].values())
    steps = hp["sup_steps"] + hp["steps"]
    model = student(task, hp["r_init"], svd=True, init_seed=seed)
    alloc = AdaLoRAAllocator(model, budget=budget, total_step=steps, tinit=steps // 10, tfinal=steps // 5,
                             deltaT=max(1, steps // 20))
    t = fit(model, task, steps, seed, orth=hp["adalora_orth"], allocator=alloc, hp=hp)
    counts = {int(n.split(".")[-1]): sum(k) for n, k in alloc.rank_pattern.items() if sum(k) > 0}
    return {"counts": counts, **score(counts, task["cfg"]["planted"]), "loss": retrain_plain(task, counts, seed, hp),
            "own_loss": test_loss(model, task), "train_s": t}


def run_alphalora(task, seed, hp=HP) -> dict:
    """AlphaLoRA's allocation on the same budget: layer alphas of the student's frozen base (each module is its own
    numbered layer), ``allocate_experts(total = planted total rank, β = 2.5, min_experts = 0)``, one rank per
    expert, then the same plain-LoRA retrain. AlphaLoRA is data-free: it reads the base weights' spectra, which do
    not hold the planted deltas, so this measures what a task-blind allocation gets."""
    from python_api.allocators.alphalora import allocate_experts, layer_alphas
    budget = sum(task["cfg"]["planted"].values())
    base = Stack([_linear(w, b) for w, b in task["base"]])
    t0 = time.perf_counter()
    alphas = layer_alphas(base)
    experts = allocate_experts(alphas, budget, beta=2.5, min_experts=0)
    t = time.perf_counter() - t0
    counts = {i: n for i, n in enumerate(experts) if n > 0}
    return {"counts": counts, **score(counts, task["cfg"]["planted"]), "loss": retrain_plain(task, counts, seed, hp),
            "alphas": [round(float(a), 4) for a in alphas], "alloc_s": t}


def run_fixed(task, seed, counts_or_r, hp=HP) -> dict:
    return {"loss": retrain_plain(task, counts_or_r, seed, hp)}


def run_one(cfg_name, seed, method, hp=HP) -> dict:
    cfg = CONFIGS[cfg_name]
    hp = {**hp, **cfg.get("hp", {})}
    task = make_task(cfg, seed, hp)
    budget = sum(cfg["planted"].values())
    if method == "adalora":
        res = run_adalora(task, seed, hp)
    elif method == "alphalora":
        res = run_alphalora(task, seed, hp)
    elif method == "uniform":
        r = math.ceil(budget / cfg["layers"])
        res = {**run_fixed(task, seed, r, hp), "rank": r, "total_rank": r * cfg["layers"]}
    elif method == "oracle":
        res = run_fixed(task, seed, dict(cfg["planted"]), hp)
    else:
        res = run_shaplora(task, method.removeprefix("shaplora:"), seed, hp)
    return {"config": cfg_name, "seed": seed, "method": method, "budget": budget,
            "planted": {str(k): v for k, v in cfg["planted"].items()}, **res,
            "counts": {str(k): v for k, v in res.get("counts", {}).items()} if "counts" in res else None}


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["config"], r["method"]) for r in rows})
    for cfg, method in keys:
        rs = [r for r in rows if r["config"] == cfg and r["method"] == method]
        losses = torch.tensor([r["loss"] for r in rs], dtype=torch.float64)
        s = {"config": cfg, "method": method, "seeds": sorted(r["seed"] for r in rs),
             "loss_mean": float(losses.mean()), "loss_sd": float(losses.std()) if len(rs) > 1 else 0.0}
        if rs[0].get("counts") is not None:
            s["exact"] = f"{sum(r['exact'] for r in rs)}/{len(rs)}"
            s["support"] = f"{sum(r['support'] for r in rs)}/{len(rs)}"
        for key in ("svd_loss", "own_loss"):  # the workflow's SVD-form retrain (default variant), AdaLoRA's own model
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                s[f"{key}_mean"] = sum(vals) / len(vals)
        if "stability" in rs[0]:
            s["stability_min"] = min(r["stability"] for r in rs)
        out.append(s)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--seed-start", type=int, default=0, help="run seeds seed-start .. seeds-1 (split over processes)")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--methods", nargs="*", default=None,
                    help="oracle, uniform, adalora, alphalora, shaplora:<variant> (default: all, every variant)")
    ap.add_argument("--out", default="planted_cpu")
    args = ap.parse_args(argv)
    threads = pin_threads(int(os.environ.get("BENCH_THREADS") or 1))
    runs_path = os.path.join(RESULTS, f"{args.out}_runs.jsonl")
    rows, done = [], set()
    if os.path.exists(runs_path):
        with open(runs_path) as f:
            for line in f:
                r = json.loads(line) if line.strip() else None
                if r is not None and (r["config"], r["seed"], r["method"]) not in done:  # first of any duplicate
                    done.add((r["config"], r["seed"], r["method"]))
                    rows.append(r)
    methods = args.methods or ["oracle", "uniform", "adalora", "alphalora"] + [f"shaplora:{v}" for v in args.variants]
    for cfg_name in args.configs:
        for seed in range(args.seed_start, args.seeds):
            for method in methods:
                if (cfg_name, seed, method) in done:
                    continue
                t0 = time.perf_counter()
                row = run_one(cfg_name, seed, method)
                row["wall_s"] = round(time.perf_counter() - t0, 2)
                rows.append(row)
                with open(runs_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{cfg_name} seed {seed} {method:20s} loss {row['loss']:.4f} "
                      f"{'exact' if row.get('exact') else ''} counts {row.get('counts')} {row['wall_s']}s", flush=True)
    summary = summarize(rows)
    meta = {"hp": HP, "configs": {k: {**v, "planted": {str(i): r for i, r in v["planted"].items()}}
                                  for k, v in CONFIGS.items()},
            "variants": VARIANTS, "default_variant": DEFAULT_VARIANT, "threads": threads,
            "torch": torch.__version__, "commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                      time.gmtime())}
    with open(os.path.join(RESULTS, f"{args.out}.json"), "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": rows}, f, indent=1)
    lines = ["| config | method | exact | support | rel. test loss mean ± sd | SVD-form / AdaLoRA's own loss | seeds "
             "| min stability |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        other = s.get("svd_loss_mean", s.get("own_loss_mean"))
        stab = s.get("stability_min")
        lines.append(f"| {s['config']} | {s['method']} | {s.get('exact', '-')} | {s.get('support', '-')} | "
                     f"{s['loss_mean']:.2e} ± {s['loss_sd']:.1e} | {'-' if other is None else f'{other:.2e}'} | "
                     f"{s['seeds']} | {'-' if stab is None else f'{stab:.2f}'} |")
    with open(os.path.join(RESULTS, f"{args.out}.md"), "w") as f:
        f.write(f"Planted structure (bench/bench_planted.py, commit {meta['commit']}, {meta['date']}); loss = "
                "teacher–student test MSE after the plain-LoRA retrain, relative to the untrained student.\n\n"
                + "\n".join(lines) + "\n")
    for s in summary:
        print(f"{s['config']:16s} {s['method']:22s} exact {s.get('exact', '-'):>5s} support {s.get('support', '-'):>5s}"
              f" loss {s['loss_mean']:.4f}±{s['loss_sd']:.4f}")


if __name__ == "__main__":
    main()
