"""Allocation overhead per training step on CPU, side by side in one process (PERFORMANCE.md protocol).

Rows: this package's AdaLoRA allocator (fused sensitivity + mask) vs PEFT's ``RankAllocator.update_and_allocate``
on the SAME PEFT AdaLoRA model, weights and gradients (MiniLM-L6-shaped BERT built from its config, every
linear of the encoder adapted, r=12: 36 modules, 108 tensors, 0.50M adapter params); the sensitivity update
alone (tracker.update with the native CPU loop, and with the pure-torch reference via LORA_KERNELS_BACKEND=torch,
vs PEFT's update_ipt); and the cost of one ShapLoRA Taylor pass relative to one validation epoch on the same
model with this package's LoRALinear adapters. Ratio rows (unit "ratio", peft / provider) come from the
same interleaved measurement.
Run: ``python -m bench.bench_alloc`` → bench/results/alloc_cpu.{json,csv}. BENCH_THREADS overrides THREADS.
``run(quick=True)`` (``lora-kernels bench --quick``): a 2-layer model, 5 repeats, no layer sweep → alloc_cpu_quick.
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn


from bench.harness import format_table, make_row, measure, pin_threads, results_dir, write_results
from python_api.allocators.adalora import AdaLoRAAllocator, peft_adapters
from python_api.layers import LoRALinear
from python_api.allocators.shaplora import shapley_sensitivity

THREADS = int(os.environ.get("BENCH_THREADS") or 1)  # pinned: the 2-core box is shared; 1 keeps ratios stable
REPEATS, WARMUP = 41, 5
SHAPE = "MiniLM-L6 (h384, ffn1536, 6 layers), 36 modules, r=12"
LAYER_SWEEP = (2, 12, 24)  # with the 6-layer run above
QUICK = {"layers": 2, "repeats": 5, "warmup": 1}


def _row(op, provider, mode, stats, shape=SHAPE, unit="ms"):
    return make_row(op, provider, mode, shape, torch.float32, "cpu", stats, unit=unit, threads=THREADS)


def _bert_config(layers: int = 6):
    from transformers import BertConfig
    return BertConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=layers, num_attention_heads=12,
                      intermediate_size=1536, max_position_embeddings=128, num_labels=2)


TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def bench_allocator(rows, layers: int = 6, repeats: int = REPEATS, ratios: bool = True, warmup: int = WARMUP):
    """Ours vs PEFT on one PEFT AdaLoRA BERT (h384) with ``layers`` layers; ``ratios`` adds the speedup rows."""
    import peft
    from transformers import BertForSequenceClassification
    torch.manual_seed(0)
    total = 10_000
    cfg = peft.AdaLoraConfig(init_r=12, target_r=8, target_modules=TARGETS, lora_alpha=32, total_step=total,
                             tinit=0, tfinal=0, deltaT=1, lora_dropout=0.0)
    model = peft.get_peft_model(BertForSequenceClassification(_bert_config(layers)), cfg)
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

    def restore():  # masking zeroes λ: give both sides the same weights every step (untimed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in params0:
                    p.copy_(params0[n])
                    p.grad = grads[n]
    step = 100  # early in the cubic schedule: a mask step with budget < init (5 of 432 triplets dropped)

    def ours_ipt_ref():
        os.environ["LORA_KERNELS_BACKEND"] = "torch"
        try:
            ours.tracker.update()
        finally:
            os.environ.pop("LORA_KERNELS_BACKEND")
    fns = {"alloc/peft": lambda _: ra.update_and_allocate(model.base_model.model, step),
           "alloc/lora_kernels": lambda _: ours.update_and_allocate(step),
           "ipt/peft": lambda: ra.update_ipt(model.base_model.model),
           "ipt/lora_kernels": ours.tracker.update,
           "ipt/lora_kernels-torchref": ours_ipt_ref}
    # Masking zeroes λ: both allocators get the same weights and gradients before every timed call (untimed).
    stats = measure(fns, warmup=warmup, repeats=repeats, setup={"alloc/peft": restore, "alloc/lora_kernels": restore})
    shape = (f"{SHAPE}, {n_params / 1e6:.2f}M adapter params" if layers == 6 else
             f"BERT-h384-L{layers} ({layers} layers), {6 * layers} modules, r=12, {n_params / 1e6:.2f}M adapter params")
    ops = {"alloc": "update_and_allocate", "ipt": "sensitivity_update"}
    for key, st in stats.items():
        kind, prov = key.split("/")
        rows.append(_row(ops[kind], prov, "alloc", st, shape))
    if not ratios:
        return
    for key in ("alloc/lora_kernels", "ipt/lora_kernels", "ipt/lora_kernels-torchref"):
        kind, prov = key.split("/")
        r = stats[f"{kind}/peft"].median / stats[key].median
        rows.append(_row(f"{ops[kind]} speedup (peft/{prov})", prov, "alloc", r, shape, unit="ratio"))
        print(f"{ops[kind]}: peft / {prov} = {r:.2f}x (medians, {THREADS} thread(s))")


def bench_shapley(rows, layers: int = 6, batches: int = 4, repeats: int = 7):
    from transformers import BertForSequenceClassification
    torch.manual_seed(0)
    model = BertForSequenceClassification(_bert_config(layers))
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
           for _ in range(batches)]

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(input_ids=b[0]).logits, b[1], reduction="none")

    def val_epoch(_):
        with torch.no_grad():
            for b in val:
                loss_fn(model, b)

    def shap(_):
        shapley_sensitivity(model, val, "taylor", loss_fn=loss_fn, generator=g)

    emb = model.get_input_embeddings()

    def grad_epoch(_):
        # the floor of any gradient-based score: forward + backward down to the input embeddings, nothing else
        for b in val:
            x = emb(b[0]).detach().requires_grad_(True)
            loss = nn.functional.cross_entropy(model(inputs_embeds=x).logits, b[1], reduction="sum")
            torch.autograd.grad(loss, x)
    stats = measure({"val": val_epoch, "grad": grad_epoch, "shap": shap}, warmup=1, repeats=repeats,
                    setup=lambda: None)
    shape = (f"{'MiniLM-L6' if layers == 6 else f'BERT-h384-L{layers}'} BERT, {6 * layers} LoRALinear(svd) r=12, "
             f"{batches} batches x 16 x 64 tokens")
    rows.append(_row("validation_epoch", "lora_kernels", "fwd", stats["val"], shape))
    rows.append(_row("shapley_taylor_pass", "lora_kernels", "full", stats["shap"], shape))
    rows.append(_row("gradient_epoch", "lora_kernels", "fwd+bwd", stats["grad"], shape))
    r = stats["shap"].median / stats["val"].median
    rows.append(_row("shapley_taylor_pass/validation_epoch", "lora_kernels", "full", r, shape, unit="ratio"))
    rg = stats["shap"].median / stats["grad"].median
    rows.append(_row("shapley_taylor_pass/gradient_epoch", "lora_kernels", "full", rg, shape, unit="ratio"))
    print(f"one Shapley (taylor) pass = {r:.2f}x one validation epoch (forward only), {rg:.2f}x one forward + "
          f"backward-to-inputs epoch ({stats['grad'].median / stats['val'].median:.2f}x forward)")


def run(quick: bool = False, shapley: bool = True) -> list[dict]:
    """The allocator rows (and the Shapley pass unless ``shapley`` is False); writes alloc_cpu[_quick]."""
    pin_threads(THREADS)
    rows: list[dict] = []
    if quick:
        bench_allocator(rows, QUICK["layers"], repeats=QUICK["repeats"], warmup=QUICK["warmup"])
    else:
        bench_allocator(rows)
        for layers in LAYER_SWEEP:  # cost vs number of adapted layers (the report draws the curve)
            bench_allocator(rows, layers, repeats=15, ratios=False)
    if shapley:
        if quick:
            bench_shapley(rows, QUICK["layers"], batches=1, repeats=QUICK["repeats"])
        else:
            bench_shapley(rows)
    repeats, warmup = (QUICK["repeats"], QUICK["warmup"]) if quick else (REPEATS, WARMUP)
    write_results(rows, _NAME[quick], {"threads": THREADS, "repeats": repeats, "warmup": warmup, "quick": quick})
    return rows


_NAME = {False: "alloc_cpu", True: "alloc_cpu_quick"}


def main():
    rows = run(shapley="--alloc-only" not in sys.argv)
    print(format_table(rows))
    print(f"wrote {len(rows)} rows to {os.path.join(results_dir(), _NAME[False] + '.json')}")


if __name__ == "__main__":
    main()
