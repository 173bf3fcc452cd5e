"""Allocation overhead per training step on CPU, side by side in one process (PERFORMANCE.md protocol).

Rows: this package's AdaLoRA allocator (fused sensitivity + mask) vs PEFT's ``RankAllocator.update_and_allocate``
on the SAME PEFT AdaLoRA model, weights and gradients (MiniLM-L6-shaped BERT built from its config, every
linear of the encoder adapted, r=12: 36 modules, 0.50M adapter params); the sensitivity update alone
(tracker.update vs PEFT's update_ipt); and the cost of one ShapLoRA Taylor pass relative to one validation
epoch on the same model with this package's LoRALinear adapters.
Run: ``python bench/bench_alloc.py`` → bench/results/alloc_cpu.json.
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lora_kernels import __version__
from python_api.adalora import AdaLoRAAllocator, peft_adapters
from python_api.layers import LoRALinear
from python_api.shaplora import shapley_sensitivity

THREADS = 1  # pinned: the 2-core CI box is shared; one thread keeps the ratios stable
REPEATS, WARMUP = 15, 3
SHAPE = "MiniLM-L6 (h384, ffn1536, 6 layers), 36 modules, r=12"


def _git() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _row(op, provider, mode, times, shape=SHAPE, unit="ms"):
    q = statistics.quantiles(times, n=10)
    return {"op": op, "provider": provider, "mode": mode, "shape": shape, "dtype": "float32", "device": "cpu",
            "median": statistics.median(times), "p20": q[1], "p80": q[7], "unit": unit, "version": __version__,
            "git_commit": _git(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "threads": THREADS}


def _bert_config():
    from transformers import BertConfig
    return BertConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536, max_position_embeddings=128, num_labels=2)


TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _interleaved(fns: dict, repeats=REPEATS, warmup=WARMUP) -> dict:
    times = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(i)
            dt = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times[k].append(dt)
    return times


def bench_allocator(rows):
    import peft
    from transformers import BertForSequenceClassification
    torch.manual_seed(0)
    total = 10_000
    cfg = peft.AdaLoraConfig(init_r=12, target_r=8, target_modules=TARGETS, lora_alpha=32, total_step=total,
                             tinit=0, tfinal=0, deltaT=1, lora_dropout=0.0)
    model = peft.get_peft_model(BertForSequenceClassification(_bert_config()), cfg)
    with torch.no_grad():
        for e, _, _ in peft_adapters(model).values():
            e.normal_()
    ids = torch.randint(0, 1000, (16, 64))
    out = model(input_ids=ids, labels=torch.randint(0, 2, (16,)))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    n_params = sum(g.numel() for g in grads.values())
    params0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ra = model.base_model.rankallocator
    ours = AdaLoRAAllocator(peft_adapters(model), target_r=8, total_step=total, deltaT=1)

    def restore(_):  # masking zeroes λ: give both sides the same weights every step (untimed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in params0:
                    p.copy_(params0[n])
                    p.grad = grads[n]
    step = [100]

    def peft_alloc(i):
        restore(i)
        t0 = time.perf_counter()
        ra.update_and_allocate(model.base_model.model, step[0])
        return time.perf_counter() - t0

    def ours_alloc(i):
        restore(i)
        t0 = time.perf_counter()
        ours.update_and_allocate(step[0])
        return time.perf_counter() - t0

    def peft_ipt(i):
        t0 = time.perf_counter()
        ra.update_ipt(model.base_model.model)
        return time.perf_counter() - t0

    def ours_ipt(i):
        t0 = time.perf_counter()
        ours.tracker.update()
        return time.perf_counter() - t0
    fns = {("update_and_allocate", "peft"): peft_alloc, ("update_and_allocate", "lora_kernels"): ours_alloc,
           ("sensitivity_update", "peft"): peft_ipt, ("sensitivity_update", "lora_kernels"): ours_ipt}
    times = {k: [] for k in fns}
    for i in range(WARMUP + REPEATS):
        for k, fn in fns.items():
            dt = fn(i) * 1e3
            if i >= WARMUP:
                times[k].append(dt)
    shape = f"{SHAPE}, {n_params / 1e6:.2f}M adapter params"
    for (op, prov), t in times.items():
        rows.append(_row(op, prov, "alloc", t, shape))
    for op in ("update_and_allocate", "sensitivity_update"):
        r = statistics.median(times[(op, "peft")]) / statistics.median(times[(op, "lora_kernels")])
        print(f"{op}: peft / lora_kernels = {r:.2f}x")


def bench_shapley(rows):
    from transformers import BertForSequenceClassification
    torch.manual_seed(0)
    model = BertForSequenceClassification(_bert_config())
    model.requires_grad_(False)
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            full = f"{name}.{cname}" if name else cname
            if isinstance(child, nn.Linear) and "encoder" in full and any(full.endswith(t) for t in TARGETS):
                lin = LoRALinear.from_linear(child, r=12, alpha=32, svd=True)
                with torch.no_grad():
                    lin.lora_E.normal_()
                setattr(mod, cname, lin)
    model.eval()
    g = torch.Generator().manual_seed(0)
    val = [(torch.randint(0, 1000, (16, 64), generator=g), torch.randint(0, 2, (16,), generator=g))
           for _ in range(4)]

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(input_ids=b[0]).logits, b[1], reduction="none")

    def val_epoch(_):
        with torch.no_grad():
            for b in val:
                loss_fn(model, b)

    def shap(_):
        shapley_sensitivity(model, val, "taylor", loss_fn=loss_fn, generator=g)
    times = _interleaved({"val": val_epoch, "shap": shap}, repeats=7, warmup=1)
    shape = "MiniLM-L6 BERT, 36 LoRALinear(svd) r=12, 4 batches x 16 x 64 tokens"
    rows.append(_row("validation_epoch", "lora_kernels", "fwd", times["val"], shape))
    rows.append(_row("shapley_taylor_pass", "lora_kernels", "full", times["shap"], shape))
    r = statistics.median(times["shap"]) / statistics.median(times["val"])
    rows.append(_row("shapley_taylor_pass/validation_epoch", "lora_kernels", "full",
                     [a / b for a, b in zip(times["shap"], times["val"])], shape, unit="ratio"))
    print(f"one Shapley (taylor) pass = {r:.2f}x one validation epoch")


def main():
    torch.set_num_threads(THREADS)
    rows: list[dict] = []
    bench_allocator(rows)
    bench_shapley(rows)
    out = os.path.join(ROOT, "bench", "results", "alloc_cpu.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
