"""GPU benchmarks of the gated LoRA op (run by bench/gpu_suite.sh on a GPU machine; needs CUDA).

Rows (bench.harness schema) to bench/results/gated_gpu_<card>.json:
- T=8192, d_in=d_out=4096, r=16, bf16, forward+backward (dx, dA, dB; no dW): frozen nn.Linear (floor),
  eager torch LoRA (PEFT's formulation: separate kernels, scale pass, extra add), LoRALinear via the
  triton backend; overhead over the floor and achieved TFLOP/s (PERFORMANCE.md: limit ≈1.2%, target ≤ 8%).
- masked rank: k of R active vs dense rank-k; R=128 with 25% active vs full.
- decode shapes T = 1..64: cuda skinny kernels vs triton vs torch.
"""
from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from bench.harness import format_table, make_row, write_results


def _bench(fn, n_inputs_rotation=1):
    import triton.testing
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return tuple(float(v) for v in ms)


class EagerLoRA(nn.Module):
    """PEFT's formulation without the dependency (the GPU machine has no internet): base + dropout copy
    + x@Aᵀ@Bᵀ·s in separate kernels, fp32 adapters cast per call (autocast style)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(r, base.in_features, device=base.weight.device) * 0.01)
        self.B = nn.Parameter(torch.randn(base.out_features, r, device=base.weight.device) * 0.01)
        self.s = alpha / r

    def forward(self, x):
        return self.base(x) + (x @ self.A.to(x.dtype).t() @ self.B.to(x.dtype).t()) * self.s


def _full_step(layer, xs, dy):
    it = [0]

    def fn():
        x = xs[it[0] % len(xs)]
        it[0] += 1
        x.grad = None
        layer(x).backward(dy)
    return fn


def bench_training_shape(card, rows, T=8192, d=4096, r=16, dtype=torch.bfloat16):
    from python_api import LoRALinear
    torch.manual_seed(0)
    base = nn.Linear(d, d, device="cuda", dtype=dtype)
    base.requires_grad_(False)
    # rotate several inputs so L2 does not flatter (each x is 64 MB)
    xs = [torch.randn(T, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]
    dy = torch.randn(T, d, device="cuda", dtype=dtype)
    ours = LoRALinear.from_linear(base, r, 2 * r)
    nn.init.normal_(ours.lora_B, std=0.01)
    providers = {"nn.Linear": base, "eager_lora(peft-like)": EagerLoRA(base, r, 2 * r), "lora_kernels": ours}
    flops_base = 2 * T * d * d * 2          # fwd + dx
    flops_lora = 2 * T * r * (d + d) * 3    # fwd shrink+expand, bwd dZ, dx, dA, dB (approx.)
    res = {}
    for name, layer in providers.items():
        res[name] = _bench(_full_step(layer, xs, dy))
    floor = res["nn.Linear"][0]
    for name, st in res.items():
        flops = flops_base + (0 if name == "nn.Linear" else flops_lora)
        rows.append(make_row("lora_linear", name, "full", f"T{T}-d{d}-r{r}", dtype, card, st,
                             overhead_vs_linear=round(st[0] / floor - 1, 4),
                             tflops=round(flops / (st[0] * 1e-3) / 1e12, 1)))


def bench_masked(card, rows, T=8192, d=4096, dtype=torch.bfloat16):
    from python_api import LoRALinear
    base = nn.Linear(d, d, device="cuda", dtype=dtype)
    base.requires_grad_(False)
    xs = [torch.randn(T, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2)]
    dy = torch.randn(T, d, device="cuda", dtype=dtype)
    for R, k in ((16, 4), (16, 8), (128, 32), (128, 128)):
        masked = LoRALinear.from_linear(base, R, 2 * R)
        mask = torch.zeros(R, dtype=torch.bool)
        mask[:k] = True
        masked.set_rank_mask(mask)
        dense = LoRALinear.from_linear(base, k, 2 * R)
        st_m, st_d = _bench(_full_step(masked, xs, dy)), _bench(_full_step(dense, xs, dy))
        rows.append(make_row("lora_linear_masked", "lora_kernels", "full", f"T{T}-d{d}-R{R}-active{k}", dtype, card,
                             st_m, ratio_vs_dense_rank_k=round(st_m[0] / st_d[0], 4)))


def bench_decode(card, rows, d=4096, r=16, dtype=torch.bfloat16):
    from python_api import lora_linear
    w = torch.randn(d, d, device="cuda", dtype=dtype)
    a = torch.randn(r, d, device="cuda") * 0.01
    b = torch.randn(d, r, device="cuda") * 0.01
    for T in (1, 4, 16, 64):
        x = torch.randn(T, d, device="cuda", dtype=dtype)
        for backend in ("torch", "triton", "cuda"):
            os.environ["LORA_KERNELS_BACKEND"] = backend
            try:
                st = _bench(lambda x=x: lora_linear(x, w, None, a, b, 2.0, training=False))
            except Exception as e:  # report, don't hide: a row with the reason
                rows.append({"op": "lora_linear_decode", "provider": backend, "shape": f"T{T}-d{d}-r{r}",
                             "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            finally:
                os.environ.pop("LORA_KERNELS_BACKEND", None)
            rows.append(make_row("lora_linear_decode", backend, "fwd", f"T{T}-d{d}-r{r}", dtype, card, st))


def main():
    ap = argparse.ArgumentParser(description="GPU benchmarks of the gated LoRA op")
    ap.add_argument("--out", default=None, help="also copy the result file here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device")
    card = torch.cuda.get_device_name()
    rows: list[dict] = []
    for fn in (bench_training_shape, bench_masked, bench_decode):
        try:
            fn(card, rows)
        except Exception as e:
            rows.append({"op": fn.__name__, "error": f"{type(e).__name__}: {e}"[:500]})
    tag = card.replace(" ", "_").replace("/", "_")
    path = write_results(rows, f"gated_gpu_{tag}", {"card": card})
    if args.out:
        import shutil
        shutil.copy(path, args.out)
    print(format_table([r for r in rows if "median" in r]))
    for r in rows:
        if "error" in r:
            print("ERROR", r)


if __name__ == "__main__":
    main()
