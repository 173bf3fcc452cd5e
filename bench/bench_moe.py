"""MoE-LoRA layer forward+backward on CPU, side by side: the gated-op layer vs a Python loop over experts,
and vs a plain LoRA of the same total rank E·r (the cost floor of the shrink/expand GEMMs).
Run: ``python -m bench.bench_moe`` → bench/results/moe_cpu.{json,csv}. ``run(quick=True)`` (``lora-kernels bench
--quick``): one small shape, 3 repeats → moe_cpu_quick.
"""
from __future__ import annotations

import os


import torch
from torch import nn

from bench.harness import format_table, make_row, measure, pin_threads, results_dir, write_results
from python_api.layers import LoRALinear
from python_api.moe import MoELoRALinear

SHAPES = [(2048, 768, 8, 8, 2), (2048, 768, 4, 8, 2)]  # T, d, experts, r, top_k
QUICK_SHAPES = [(256, 128, 4, 4, 2)]


def loop_forward(layer: MoELoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The peer: MoLA-style loop over experts, one LoRA per expert weighted by the top-k routing (no dropout;
    adapters cast to x's dtype per call, as autocast would). x [T, K] → [T, N]."""
    w, _, _ = layer.routing(x)                                               # [T, E] fp32
    y = nn.functional.linear(x, layer.weight, layer.bias)
    r = layer.r
    for e in range(layer.num_experts):
        a = layer.lora_A[e * r:(e + 1) * r].to(x.dtype)                      # [r, K]
        b = layer.lora_B[:, e * r:(e + 1) * r].to(x.dtype)                   # [N, r]
        y = y + (w[:, e:e + 1] * layer.scaling).to(x.dtype) * ((x @ a.t()) @ b.t())
    return y


def run(quick: bool = False) -> list[dict]:
    """Every provider at every shape (``quick``: one small shape, 3 repeats); writes moe_cpu[_quick]."""
    threads = pin_threads(int(os.environ.get("BENCH_THREADS") or 2))
    repeats = 3 if quick else int(os.environ.get("BENCH_REPEATS") or 7)
    rows = []
    for T, d, E, r, k in QUICK_SHAPES if quick else SHAPES:
        torch.manual_seed(0)
        moe = MoELoRALinear.from_linear(nn.Linear(d, d), E, r, alpha=16, top_k=k)
        nn.init.normal_(moe.lora_B)
        lora = LoRALinear.from_linear(nn.Linear(d, d), E * r, alpha=16)
        x = torch.randn(T, d, requires_grad=True)

        def run(f, x=x):
            return lambda: f(x).sum().backward()

        fns = {"moe-gated-op": run(moe), "moe-python-loop": run(lambda z, m=moe: loop_forward(m, z)),
               f"plain-lora-r{E * r}": run(lora),
               "nn.Linear-frozen": run(lambda z, m=moe: nn.functional.linear(z, m.weight, m.bias))}
        stats = measure(fns, warmup=1 if quick else 2, repeats=repeats)
        base = stats["moe-python-loop"].median
        for p, s in stats.items():
            rows.append(make_row("moe_lora_linear", p, "full", f"T{T}-d{d}-E{E}-r{r}-k{k}", torch.float32, "cpu",
                                 s, ratio_vs_python_loop=round(s.median / base, 3)))
    meta = {"threads": threads, "repeats": repeats, "quick": quick} if quick else {"threads": threads}
    write_results(rows, "moe_cpu_quick" if quick else "moe_cpu", meta)
    return rows


def main():
    rows = run()
    print(format_table(rows, ("provider", "shape", "median", "p20", "p80", "ratio_vs_python_loop")))
    print(os.path.join(results_dir(), "moe_cpu.json"))


if __name__ == "__main__":
    main()
