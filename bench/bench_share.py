"""ShareLoRA on CPU: parameters, optimizer state and peak memory (LoRA vs ShareA/B/AB), and the cost of
in-place shared-gradient accumulation and of computing the shrink once for q, k, v.

    python -m bench.bench_share [--quick]          # writes bench/results/share_cpu.{json,csv}

Memory: each variant (RoBERTa-base shape from its config, random weights, q+v, r=8, AdamW, batch 4 x 128 tokens)
takes one training step, then the CPU allocator's peak over the second step (bench.harness.peak_alloc_bytes).
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from bench.harness import format_table, make_row, measure, peak_alloc_bytes, pin_threads, write_results

VARIANTS = {"lora": None, "shareA": "A", "shareB": "B", "shareAB": "AB"}


def _train_memory(share: str | None, layers: int, batch: int, seq: int) -> dict:
    from transformers import RobertaConfig, RobertaModel

    from python_api import apply_adapters, count_trainable
    torch.manual_seed(0)
    m = RobertaModel(RobertaConfig(num_hidden_layers=layers), add_pooling_layer=False)
    apply_adapters(m, ["query", "value"], r=8, alpha=16, share=share)
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 1000, (batch, seq))

    def step():
        m(ids).last_hidden_state.square().mean().backward()
        opt.step()
    step()
    # set_to_none outside the profiled call: the profiler does not see frees of older tensors
    opt.zero_grad(set_to_none=True)
    peak = peak_alloc_bytes(step)["peak"]
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in m.parameters() if p.grad is not None)
    return {"trainable": count_trainable(m), "opt_state_bytes": state, "grad_bytes": grads, "peak_step_bytes": peak}


def bench_memory(quick: bool) -> list[dict]:
    layers, batch, seq = (2, 2, 32) if quick else (12, 4, 128)
    rows = []
    shape = f"roberta-base-L{layers}-qv-r8-B{batch}x{seq}"
    for name, share in VARIANTS.items():
        res = _train_memory(share, layers, batch, seq)
        rows.append(make_row("trainable_params", name, "alloc", shape, torch.float32, "cpu", res["trainable"],
                             "params"))
        rows.append(make_row("optimizer_state", name, "alloc", shape, torch.float32, "cpu",
                             res["opt_state_bytes"], "bytes", optimizer="AdamW"))
        rows.append(make_row("grad_buffers", name, "alloc", shape, torch.float32, "cpu", res["grad_bytes"], "bytes"))
        rows.append(make_row("peak_step_bytes", name, "full", shape, torch.float32, "cpu", res["peak_step_bytes"],
                             "bytes", step=2))
    return rows


def shared_stack(L: int, K: int, N: int, r: int, accumulate: str, device="cpu", dtype=torch.float32):
    """L SharedLoRALinear layers [K → N], rank r, sharing one A; ``accumulate``: "inplace" or "autograd"."""
    from python_api.share import SharedLoRALinear, ShareGroup
    torch.manual_seed(0)

    def base():
        return nn.Linear(K, N, device=device, dtype=dtype)
    first = SharedLoRALinear.from_linear(base(), r, 2 * r)
    grp = ShareGroup("bench.lora_A", "lora_A", multi_type=False)
    layers = [first] + [SharedLoRALinear.from_linear(base(), r, 2 * r, lora_A=first.lora_A) for _ in range(L - 1)]
    for lay in layers:
        nn.init.normal_(lay.lora_B, std=0.02)
        lay.configure_sharing(grp, None, accumulate)
    return layers


def bench_accumulation(quick: bool, threads: int) -> list[dict]:
    """Backward of L layers sharing one A: in-place accumulation vs autograd's per-layer dA + sum."""
    L, T, K, N, r = (4, 256, 128, 128, 8) if quick else (12, 2048, 768, 768, 8)
    rows = []
    for need_dx in (False, True):
        stacks = {acc: shared_stack(L, K, N, r, acc) for acc in ("inplace", "autograd")}
        xs = [torch.randn(T, K, requires_grad=need_dx) for _ in range(L)]
        dys = [torch.randn(T, N) for _ in range(L)]

        def setup_for(layers, xs=xs, dys=dys):
            def setup():
                layers[0].lora_A.grad = None
                for lay in layers:
                    lay.lora_B.grad = None
                for x in xs:
                    x.grad = None
                outs = [lay(x) for lay, x in zip(layers, xs)]
                return sum((o * dy).sum() for o, dy in zip(outs, dys))
            return setup
        stats = measure({k: (lambda loss: loss.backward()) for k in stacks}, warmup=2, repeats=5 if quick else 9,
                        setup={k: setup_for(v) for k, v in stacks.items()}, threads=threads)
        ga = [stacks[k][0].lora_A.grad for k in stacks]
        err = float((ga[0] - ga[1]).abs().max() / ga[1].abs().max())
        shape = f"L{L}-T{T}-d{K}x{N}-r{r}" + ("-with-dx" if need_dx else "-no-dx")
        for k, st in stats.items():
            rows.append(make_row("shared_a_grad_accumulation", k, "bwd", shape, torch.float32, "cpu", st,
                                 ratio_vs_autograd=round(st.median / stats["autograd"].median, 4),
                                 rel_err_vs_autograd=err, threads=threads))
    return rows


def bench_shrink_reuse(quick: bool, threads: int) -> list[dict]:
    """q, k, v sharing A on one input: H = x Aᵀ once (reuse) vs once per projection."""
    from python_api import apply_adapters
    T, d, r = (256, 128, 8) if quick else (2048, 768, 8)

    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, x):
            return self.q(x) + self.k(x) + self.v(x)
    torch.manual_seed(0)
    blk = {}
    for reuse in (True, False):
        torch.manual_seed(0)
        blk[reuse] = apply_adapters(QKV(), ["q", "k", "v"], r=r, share="A", share_scope="attention",
                                    reuse_shrink=reuse)
    x = torch.randn(T, d, requires_grad=True)
    dy = torch.randn(T, d)

    def full(m):
        def fn():
            x.grad = None
            m.zero_grad(set_to_none=True)
            m(x).backward(dy)
        return fn

    def fwd(m):
        def fn():
            with torch.no_grad():
                m(x)
        return fn
    rows = []
    shape = f"qkv-T{T}-d{d}-r{r}"
    for mode, make in (("fwd", fwd), ("full", full)):
        stats = measure({("reuse" if k else "per_projection"): make(m) for k, m in blk.items()}, warmup=2,
                        repeats=5 if quick else 11, threads=threads)
        for k, st in stats.items():
            rows.append(make_row("shared_qkv_shrink", k, mode, shape, torch.float32, "cpu", st,
                                 ratio_vs_per_projection=round(st.median / stats["per_projection"].median, 4),
                                 threads=threads))
    return rows


def run(quick: bool) -> list[dict]:
    threads = pin_threads()
    rows = bench_memory(quick) + bench_accumulation(quick, threads) + bench_shrink_reuse(quick, threads)
    write_results(rows, "share_cpu_quick" if quick else "share_cpu", {"threads": threads, "quick": quick})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    rows = run(a.quick)
    print(format_table(rows, cols=("op", "provider", "mode", "shape", "median", "unit")))
    for r in rows:
        extra = {k: v for k, v in r.items() if k.startswith(("ratio", "rel_err"))}
        if extra:
            print(r["op"], r["provider"], r["shape"], extra)


if __name__ == "__main__":
    main()
