"""Gated LoRA linear microbenchmarks (CPU, side by side in one process).

Providers: plain frozen ``nn.Linear`` (the floor), PEFT's LoRA ``Linear``, this package's ``LoRALinear``
(torch path on CPU). Modes: ``full`` = forward + backward with dx (as inside a network), ``fwd`` = inference
forward under ``no_grad``. Also: cost vs active rank (a rank-R layer with k of R ranks on vs a dense rank-k
layer), the per-token gate [T, r] (the MoE path) vs the same math written as autograd ops, and scaling sweeps
(cost vs tokens at r=16, cost vs rank at T=2048) whose shapes differ in one size so the report draws curves.

    python -m bench.bench_gated [--quick]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from bench.harness import format_table, make_row, measure, pin_threads, write_results

SHAPES = {  # name: (T, d_in, d_out, r)
    "T2048-d768-r8": (2048, 768, 768, 8),
    "T2048-d768-r16": (2048, 768, 768, 16),
    "T4096-d1024-r16": (4096, 1024, 1024, 16),
}
QUICK_SHAPES = {"T512-d256-r8": (512, 256, 256, 8)}
TOKEN_SWEEP = [(T, 768, 768, 16) for T in (256, 512, 1024, 4096)]      # + T2048-d768-r16 above
RANK_SWEEP = [(2048, 768, 768, r) for r in (4, 32, 64)]                # + r8 and r16 above
ACTIVE_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)


def _peft_linear(base: nn.Linear, r: int, alpha: int):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0)
    layer = PeftLoraLinear(base, adapter_name="default", config=cfg, r=r, lora_alpha=alpha, lora_dropout=0.0)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return layer


def _ours(base: nn.Linear, r: int, alpha: int):
    from python_api import LoRALinear
    layer = LoRALinear.from_linear(base, r, alpha)
    nn.init.normal_(layer.lora_B, std=0.02)
    return layer


def _step(layer, x, dy):
    def fn():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(dy)
    return fn


def _infer(layer, x):
    def fn():
        with torch.no_grad():
            layer(x)
    return fn


def _name(T, K, N, r) -> str:
    return f"T{T}-d{K}-r{r}" if K == N else f"T{T}-d{K}x{N}-r{r}"


def bench_providers(shapes, repeats, warmup, modes=("full", "fwd")) -> list[dict]:
    rows = []
    for name, (T, K, N, r) in shapes.items():
        torch.manual_seed(0)
        base = nn.Linear(K, N)
        base.requires_grad_(False)
        x = torch.randn(T, K, requires_grad=True)
        dy = torch.randn(T, N)
        layers = {"nn.Linear": base, "peft": _peft_linear(base, r, 2 * r), "lora_kernels": _ours(base, r, 2 * r)}
        for mode in modes:
            fns = {k: (_step(v, x, dy) if mode == "full" else _infer(v, x)) for k, v in layers.items()}
            stats = measure(fns, warmup=warmup, repeats=repeats)
            floor, peft = stats["nn.Linear"][0], stats["peft"][0]
            for prov, st in stats.items():
                rows.append(make_row("lora_linear", prov, mode, name, torch.float32, "cpu", st,
                                     ratio_vs_linear=round(st[0] / floor, 4), ratio_vs_peft=round(st[0] / peft, 4)))
    return rows


def bench_token_gate(T, K, N, r, repeats, warmup) -> list[dict]:
    """Per-token gate G [T, r] (what MoE-LoRA routing produces) through the layer vs the same math as autograd
    ops: y = x Wᵀ + b + s ((x Aᵀ) ⊙ G) Bᵀ."""
    torch.manual_seed(0)
    base = nn.Linear(K, N)
    base.requires_grad_(False)
    ours = _ours(base, r, 2 * r)
    a = ours.lora_A.detach().clone().requires_grad_(True)
    b = ours.lora_B.detach().clone().requires_grad_(True)
    x = torch.randn(T, K, requires_grad=True)
    dy = torch.randn(T, N)
    gate = torch.rand(T, r)
    ours.set_token_gate(gate)
    scale = ours.scaling

    def composite():
        x.grad = a.grad = b.grad = None
        (base(x) + scale * ((x @ a.t()) * gate) @ b.t()).backward(dy)
    stats = measure({"lora_kernels": _step(ours, x, dy), "autograd-composite": composite}, warmup=warmup,
                    repeats=repeats)
    ref = stats["autograd-composite"][0]
    return [make_row("lora_linear_token_gate", prov, "full", _name(T, K, N, r), torch.float32, "cpu", st,
                     ratio_vs_composite=round(st[0] / ref, 4)) for prov, st in stats.items()]


def bench_active_rank(T, K, N, R, repeats, warmup) -> list[dict]:
    """Rank-R layer with k active vs a dense rank-k layer (the target: within 15%)."""
    rows = []
    torch.manual_seed(0)
    base = nn.Linear(K, N)
    base.requires_grad_(False)
    x = torch.randn(T, K, requires_grad=True)
    dy = torch.randn(T, N)
    for frac in ACTIVE_FRACTIONS:
        k = max(1, int(R * frac))
        masked = _ours(base, R, 2 * R)
        mask = torch.zeros(R, dtype=torch.bool)
        mask[torch.randperm(R)[:k]] = True
        masked.set_rank_mask(mask)
        dense = _ours(base, k, 2 * R)
        stats = measure({"masked": _step(masked, x, dy), "dense": _step(dense, x, dy)}, warmup=warmup, repeats=repeats)
        shape = f"T{T}-d{K}-R{R}-active{k}"
        ratio = stats["masked"][0] / stats["dense"][0]
        rows.append(make_row("lora_linear_masked", "lora_kernels", "full", shape, torch.float32, "cpu",
                             stats["masked"], ratio_vs_dense_rank_k=round(ratio, 4)))
        rows.append(make_row("lora_linear_dense_rank_k", "lora_kernels", "full", shape, torch.float32, "cpu",
                             stats["dense"]))
    return rows


def run(quick: bool = False) -> list[dict]:
    threads = pin_threads()
    shapes = QUICK_SHAPES if quick else SHAPES
    repeats, warmup = (5, 2) if quick else (15, 5)
    rows = bench_providers(shapes, repeats, warmup)
    if not quick:
        sweep = {_name(*s): s for s in TOKEN_SWEEP + RANK_SWEEP}
        rows += bench_providers(sweep, repeats=9, warmup=3, modes=("full",))
    rows += bench_active_rank(*((512, 256, 256, 16) if quick else (2048, 768, 768, 64)), repeats, warmup)
    rows += bench_token_gate(*((512, 256, 256, 8) if quick else (2048, 768, 768, 16)), repeats, warmup)
    write_results(rows, "gated_cpu_quick" if quick else "gated_cpu", {"threads": threads, "quick": quick})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    rows = run(ap.parse_args().quick)
    print(format_table(rows, cols=("op", "provider", "shape", "median", "unit")))
    for r in rows:
        extra = {k: v for k, v in r.items() if k.startswith("ratio")}
        if extra:
            print(r["provider"], r["shape"], extra)


if __name__ == "__main__":
    main()
