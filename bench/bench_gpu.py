"""GPU benchmarks of every kernel family, each against its peer and the floor (run by bench/gpu_suite.sh).

    python -m bench.bench_gpu [--only training sensitivity ...] [--out DIR] [--budget-s 360]

Families (``--only`` names) and the file their rows go to (bench.harness schema, in bench/results/):
  gated_gpu_<card>.{json,csv}
    training    T=8192, d=4096, r=16, bf16, forward+backward (dx, dA, dB; no dW): frozen nn.Linear (floor), eager
                PEFT-like LoRA (separate kernels, fp32 adapters cast per call), LoRALinear (auto backend).
                Overhead over the floor and TFLOP/s (PERFORMANCE.md: limit ≈1.2%, target ≤ 5%).
    token_gate  per-token gate G [T, r] through LoRALinear vs the same math as eager autograd ops, and the floor.
    masked      k of R ranks active vs a dense rank-k layer.
    decode      T = 1..64 forward: torch vs triton vs cuda backends; GB/s (weight-streaming bound).
  kernels_gpu_<card>.{json,csv}
    sensitivity the fused AdaLoRA sensitivity update over a 7B-like adapter set (32 layers × 7 projections, r=16,
                d=4096/11008: 40.0M params) per backend (public op with its argument checks, and the backend kernel
                alone) and SensitivityTracker.update, vs a PEFT-style per-parameter Python loop (PEFT's update_ipt
                + mask_to_budget triplet scores); effective GB/s over the minimum bytes.
    share       L=32 layers sharing one A: in-place gradient accumulation vs autograd's per-layer dA + sum.
    moe         MoE-LoRA layer (T=8192, d=4096, E=8, r=8, top-2) vs a Python loop over experts, a plain LoRA of
                rank E·r and the frozen nn.Linear.
    alpha       layer alphas (gram fp64, svd fp32) for 36 and 224 matrices vs per-matrix svdvals + a Python-loop
                Hill fit (AlphaLoRA / weightwatcher style), and batched svdvals alone (the floor).

Every family function takes ``device``, a ``timer`` (fn -> (median, p20, p80) in ms; default
``triton.testing.do_bench``) and its sizes, and returns rows; a provider that fails becomes a row with an
``error`` field, so one failure loses nothing else. tests/test_bench_gpu_cpu.py runs all of them on CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import shutil
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from bench.harness import format_table, make_row, write_results

Timer = Callable[[Callable[[], object]], tuple[float, float, float]]
BACKEND_ENV = "LORA_KERNELS_BACKEND"
# PERFORMANCE.md limits (H100 SXM: bf16 dense TFLOP/s, HBM GB/s); H200 has the same compute, faster HBM.
PEAKS = {"H100": (990.0, 3350.0), "H200": (990.0, 4800.0)}


def peaks_for(card: str) -> tuple[float, float]:
    """(TFLOP/s, GB/s) limits used for ``pct_of_peak``; the H100 figures of PERFORMANCE.md unless known better."""
    for key, val in PEAKS.items():
        if key in card:
            return val
    return PEAKS["H100"]


# ---- timers -------------------------------------------------------------------------------------------
def do_bench_timer(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> tuple[float, float, float]:
    """``triton.testing.do_bench`` quantiles 0.5/0.2/0.8 in ms (L2 flushed between calls by do_bench)."""
    import triton.testing
    return tuple(float(v) for v in triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8]))


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def budget_timer(fn: Callable[[], object], budget_s: float = 5.0, max_repeats: int = 5) -> tuple[float, float, float]:
    """For calls of 0.1–10 s (the alphas), where do_bench's five estimation calls alone would cost too much:
    one untimed warm-up call, then as many synchronised calls as fit in ``budget_s`` (1..max_repeats)."""
    t0 = time.perf_counter()
    fn()
    _sync()
    first = time.perf_counter() - t0
    n = max(1, min(max_repeats, int(budget_s / max(first, 1e-6))))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    q = lambda f: ts[min(len(ts) - 1, int(round(f * (len(ts) - 1))))]
    return q(0.5), q(0.2), q(0.8)


# ---- small helpers ------------------------------------------------------------------------------------
@contextlib.contextmanager
def forced_backend(name: str | None):
    """Sets LORA_KERNELS_BACKEND for the block (None: auto) and restores the previous value."""
    old = os.environ.get(BACKEND_ENV)
    if name is None:
        os.environ.pop(BACKEND_ENV, None)
    else:
        os.environ[BACKEND_ENV] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = old


def error_row(op: str, provider: str, shape: str, e: BaseException, device: str = "") -> dict:
    return {"op": op, "provider": provider, "shape": shape, "device": device, "error": f"{type(e).__name__}: {e}"[:500]}


def _time_all(timer: Timer, fns: dict[str, Callable], backends: dict[str, str | None] | None = None):
    """Times each provider (under its forced backend, if any); returns ({name: stats}, {name: exception})."""
    stats, errors = {}, {}
    for name, fn in fns.items():
        try:
            with forced_backend((backends or {}).get(name)):
                stats[name] = tuple(float(v) for v in timer(fn))
        except Exception as e:  # a row with the reason, the other providers still run
            errors[name] = e
    return stats, errors


def _ratio(a: float | None, b: float | None, digits: int = 4) -> float | None:
    return round(a / b, digits) if a is not None and b else None


def _med(stats: dict, name: str) -> float | None:
    return stats[name][0] if name in stats else None


def _clear_grads(*tensors_or_modules) -> None:
    for t in tensors_or_modules:
        if isinstance(t, nn.Module):
            for p in t.parameters():
                p.grad = None
        elif t is not None:
            t.grad = None


def _step(layer: Callable, xs: list[torch.Tensor], dy: torch.Tensor, extra: tuple = ()) -> Callable[[], None]:
    """Forward + backward on rotating inputs (several inputs so L2 does not flatter), grads reset each call."""
    it = [0]
    params = list(layer.parameters()) if isinstance(layer, nn.Module) else []

    def fn():
        x = xs[it[0] % len(xs)]
        it[0] += 1
        x.grad = None
        _clear_grads(*params, *extra)
        layer(x).backward(dy)
    return fn


class EagerLoRA(nn.Module):
    """PEFT's formulation without the dependency (the GPU machine has no internet): base + x@Aᵀ@Bᵀ·s in separate
    kernels, fp32 adapters cast per call (autocast style)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(r, base.in_features, device=base.weight.device) * 0.01)
        self.B = nn.Parameter(torch.randn(base.out_features, r, device=base.weight.device) * 0.01)
        self.s = alpha / r

    def forward(self, x):
        return self.base(x) + (x @ self.A.to(x.dtype).t() @ self.B.to(x.dtype).t()) * self.s


def _frozen_linear(d_in: int, d_out: int, device, dtype) -> nn.Linear:
    base = nn.Linear(d_in, d_out, device=device, dtype=dtype)
    base.requires_grad_(False)
    return base


def _lora_flops(T: int, d_in: int, d_out: int, r: int) -> tuple[float, float]:
    """(base fwd + dx FLOPs, LoRA extra FLOPs: fwd shrink+expand, bwd dZ, dx, dA, dB, approx.)."""
    return 2.0 * T * d_in * d_out * 2, 2.0 * T * r * (d_in + d_out) * 3


def _chosen_backend(x, gate) -> str:
    try:
        from lora_kernels.gated_lora import op as gated
        return gated.select_backend(x, gate, 0.0)[0]
    except Exception as e:
        return f"none ({type(e).__name__})"


# ---- gated op -----------------------------------------------------------------------------------------
def bench_training_shape(device: str = "cuda", timer: Timer | None = None, card: str = "", T: int = 8192,
                         d: int = 4096, r: int = 16, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """nn.Linear vs eager PEFT-like LoRA vs LoRALinear, forward + backward at [T, d] x [d, d], rank r."""
    from python_api import LoRALinear
    timer = timer or do_bench_timer
    torch.manual_seed(0)
    base = _frozen_linear(d, d, device, dtype)
    xs = [torch.randn(T, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    dy = torch.randn(T, d, device=device, dtype=dtype)
    ours = LoRALinear.from_linear(base, r, 2 * r)
    nn.init.normal_(ours.lora_B, std=0.01)
    providers = {"nn.Linear": base, "eager_lora(peft-like)": EagerLoRA(base, r, 2 * r), "lora_kernels": ours}
    stats, errors = _time_all(timer, {k: _step(v, xs, dy) for k, v in providers.items()})
    flops_base, flops_lora = _lora_flops(T, d, d, r)
    peak_tf = peaks_for(card)[0]
    shape = f"T{T}-d{d}-r{r}"
    floor = _med(stats, "nn.Linear")
    rows = []
    for name, st in stats.items():
        flops = flops_base + (0 if name == "nn.Linear" else flops_lora)
        tf = flops / (st[0] * 1e-3) / 1e12
        extra = {"backend": _chosen_backend(xs[0], None)} if name == "lora_kernels" else {}
        rows.append(make_row("lora_linear", name, "full", shape, dtype, card, st,
                             overhead_vs_linear=_ratio(st[0] - floor, floor) if floor else None,
                             tflops=round(tf, 2), pct_of_peak=round(100 * tf / peak_tf, 2), **extra))
    rows += [error_row("lora_linear", n, shape, e, card) for n, e in errors.items()]
    return rows


def bench_token_gate(device: str = "cuda", timer: Timer | None = None, card: str = "", T: int = 8192, d: int = 4096,
                     r: int = 16, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Per-token gate G [T, r] (fp32, trainable: what MoE routing feeds) through LoRALinear vs the same math as
    eager autograd ops ``y = x Wᵀ + b + s ((x Aᵀ) ⊙ G) Bᵀ``, and the frozen nn.Linear."""
    from python_api import LoRALinear
    timer = timer or do_bench_timer
    torch.manual_seed(0)
    base = _frozen_linear(d, d, device, dtype)
    ours = LoRALinear.from_linear(base, r, 2 * r)
    nn.init.normal_(ours.lora_B, std=0.01)
    a = ours.lora_A.detach().clone().requires_grad_(True)
    b = ours.lora_B.detach().clone().requires_grad_(True)
    xs = [torch.randn(T, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    dy = torch.randn(T, d, device=device, dtype=dtype)
    gate = torch.rand(T, r, device=device, requires_grad=True)
    ours.set_token_gate(gate)
    s = ours.scaling

    def composite(x):
        h = x @ a.to(x.dtype).t()                                       # [T, r]
        z = (h.float() * gate).to(x.dtype)                              # [T, r]
        return base(x) + (z @ b.to(x.dtype).t()) * s

    fns = {"nn.Linear": _step(base, xs, dy), "autograd-composite": _step(composite, xs, dy, (a, b, gate)),
           "lora_kernels": _step(ours, xs, dy, (gate,))}
    stats, errors = _time_all(timer, fns)
    flops_base, flops_lora = _lora_flops(T, d, d, r)
    peak_tf = peaks_for(card)[0]
    shape = f"T{T}-d{d}-r{r}"
    floor, ref = _med(stats, "nn.Linear"), _med(stats, "autograd-composite")
    rows = []
    for name, st in stats.items():
        tf = (flops_base + (0 if name == "nn.Linear" else flops_lora)) / (st[0] * 1e-3) / 1e12
        extra = {"backend": _chosen_backend(xs[0], gate)} if name == "lora_kernels" else {}
        rows.append(make_row("lora_linear_token_gate", name, "full", shape, dtype, card, st,
                             overhead_vs_linear=_ratio(st[0] - floor, floor) if floor else None,
                             ratio_vs_composite=_ratio(st[0], ref), tflops=round(tf, 2),
                             pct_of_peak=round(100 * tf / peak_tf, 2), **extra))
    rows += [error_row("lora_linear_token_gate", n, shape, e, card) for n, e in errors.items()]
    return rows


def bench_masked(device: str = "cuda", timer: Timer | None = None, card: str = "", T: int = 8192, d: int = 4096,
                 configs: tuple[tuple[int, int], ...] = ((16, 4), (16, 8), (128, 32), (128, 128)),
                 dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Rank-R layer with k active (``configs``: (R, k)) vs a dense rank-k layer, forward + backward."""
    from python_api import LoRALinear
    timer = timer or do_bench_timer
    torch.manual_seed(0)
    base = _frozen_linear(d, d, device, dtype)
    xs = [torch.randn(T, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2)]
    dy = torch.randn(T, d, device=device, dtype=dtype)
    rows = []
    for R, k in configs:
        shape = f"T{T}-d{d}-R{R}-active{k}"
        masked = LoRALinear.from_linear(base, R, 2 * R)
        mask = torch.zeros(R, dtype=torch.bool)
        mask[:k] = True
        masked.set_rank_mask(mask)
        dense = LoRALinear.from_linear(base, k, 2 * R)
        stats, errors = _time_all(timer, {"masked": _step(masked, xs, dy), "dense": _step(dense, xs, dy)})
        if "masked" in stats:
            rows.append(make_row("lora_linear_masked", "lora_kernels", "full", shape, dtype, card, stats["masked"],
                                 ratio_vs_dense_rank_k=_ratio(stats["masked"][0], _med(stats, "dense"))))
        if "dense" in stats:
            rows.append(make_row("lora_linear_dense_rank_k", "lora_kernels", "full", shape, dtype, card,
                                 stats["dense"]))
        op = {"masked": "lora_linear_masked", "dense": "lora_linear_dense_rank_k"}
        rows += [error_row(op[n], "lora_kernels", shape, e, card) for n, e in errors.items()]
    return rows


def bench_decode(device: str = "cuda", timer: Timer | None = None, card: str = "", d: int = 4096, r: int = 16,
                 tokens: tuple[int, ...] = (1, 4, 16, 64), dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Decode-shape forward (T ≤ 64) per backend; GB/s over the bytes of W, x, y, A, B (weight-streaming bound)."""
    from python_api import lora_linear
    timer = timer or do_bench_timer
    torch.manual_seed(0)
    w = torch.randn(d, d, device=device, dtype=dtype)
    a = torch.randn(r, d, device=device) * 0.01
    b = torch.randn(d, r, device=device) * 0.01
    peak_bw = peaks_for(card)[1]
    rows = []
    for T in tokens:
        x = torch.randn(T, d, device=device, dtype=dtype)
        nbytes = w.numel() * w.element_size() + 2 * x.numel() * x.element_size() + (a.numel() + b.numel()) * 4
        fns = {be: (lambda x=x: lora_linear(x, w, None, a, b, 2.0, training=False))
               for be in ("torch", "triton", "cuda")}
        stats, errors = _time_all(timer, fns, backends={be: be for be in fns})
        shape = f"T{T}-d{d}-r{r}"
        for be, st in stats.items():
            gbps = nbytes / (st[0] * 1e-3) / 1e9
            rows.append(make_row("lora_linear_decode", be, "fwd", shape, dtype, card, st, gbps=round(gbps, 1),
                                 pct_of_peak=round(100 * gbps / peak_bw, 2)))
        rows += [error_row("lora_linear_decode", be, shape, e, card) for be, e in errors.items()]
    return rows


# ---- sensitivity update -------------------------------------------------------------------------------
def _projection_shapes(d: int, ffn: int) -> dict[str, tuple[int, int]]:
    """Llama-style projections of one block: name -> (out N, in K)."""
    return {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d),
            "gate_proj": (ffn, d), "up_proj": (ffn, d), "down_proj": (d, ffn)}


def peft_style_sensitivity(triplets: dict, state: dict, beta1: float = 0.85, beta2: float = 0.85) -> torch.Tensor:
    """The peer: PEFT's ``RankAllocator.update_ipt`` (a Python loop over parameters, new tensors per op) followed
    by ``mask_to_budget``'s triplet scores, S_i = s(λ_i) + mean_k s(A_ik) + mean_n s(B_ni). Returns [total_R]."""
    with torch.no_grad():
        for name, (e, a, b) in triplets.items():
            for key, p in (("E", e), ("A", a), ("B", b)):
                n = f"{name}.{key}"
                if n not in state:
                    state[n] = (torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32))
                ipt = (p * p.grad).abs().detach()
                avg = beta1 * state[n][0] + (1 - beta1) * ipt
                unc = beta2 * state[n][1] + (1 - beta2) * (ipt - avg).abs()
                state[n] = (avg, unc)
        scores = []
        for name in triplets:
            el = {k: state[f"{name}.{k}"][0] * state[f"{name}.{k}"][1] for k in ("E", "A", "B")}
            scores.append(el["E"].view(-1) + el["A"].mean(dim=1) + el["B"].mean(dim=0))
        return torch.cat(scores)


def bench_sensitivity(device: str = "cuda", timer: Timer | None = None, card: str = "", layers: int = 32,
                      d: int = 4096, ffn: int = 11008, r: int = 16, dtype: torch.dtype = torch.float32,
                      backends: tuple[str, ...] = ("torch", "triton", "cuda")) -> list[dict]:
    """Fused sensitivity update over ``layers`` × 7 projections (λ [r], A [r, K], B [N, r] each) per backend,
    vs the PEFT-style loop. ``dtype`` is the adapters' (fp32 master weights under a bf16 base)."""
    from lora_kernels.dispatch import Problem, select
    from lora_kernels.sensitivity import KIND_A, KIND_B, KIND_E, fused_sensitivity_update
    from lora_kernels.sensitivity.op import REGISTRY
    from python_api.allocators.sensitivity import SensitivityTracker
    timer = timer or do_bench_timer
    torch.manual_seed(0)
    triplets: dict[str, tuple] = {}
    for li in range(layers):
        for proj, (N, K) in _projection_shapes(d, ffn).items():
            ts = []
            for shape in ((r,), (r, K), (N, r)):
                p = nn.Parameter(torch.randn(shape, device=device, dtype=dtype) * 0.02)
                p.grad = torch.randn(shape, device=device, dtype=dtype) * 1e-3
                ts.append(p)
            triplets[f"layers.{li}.{proj}"] = tuple(ts)
    params, kinds, offsets = [], [], []
    for m, (e, a, b) in enumerate(triplets.values()):
        for t, k in ((e, KIND_E), (a, KIND_A), (b, KIND_B)):
            params.append(t.detach())
            kinds.append(k)
            offsets.append(m * r)
    grads = [t.grad for trip in triplets.values() for t in trip]
    n_el = sum(p.numel() for p in params)
    total_r = len(triplets) * r
    # State as views of two flat buffers, as SensitivityTracker allocates it (the torch backend's fast path).
    flat_i = torch.zeros(n_el, device=device)
    flat_u = torch.zeros(n_el, device=device)
    ipt, unc, pos = [], [], 0
    for p in params:
        ipt.append(flat_i[pos: pos + p.numel()].view(p.shape))
        unc.append(flat_u[pos: pos + p.numel()].view(p.shape))
        pos += p.numel()
    scores = torch.zeros(total_r, device=device)
    # minimum traffic: read p, g, Ī, Ū; write Ī, Ū; read + write the scores
    nbytes = sum(p.numel() * (p.element_size() + g.element_size() + 16) for p, g in zip(params, grads)) + 8 * total_r
    shape = f"{layers}L-x7proj-d{d}-ffn{ffn}-r{r} ({n_el / 1e6:.1f}M params)"
    peak_bw = peaks_for(card)[1]
    ref = peft_style_sensitivity(triplets, {})                  # one step from zero state: the correctness oracle

    def rel_err(got: torch.Tensor) -> float:
        return float((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))

    def public():
        scores.zero_()
        fused_sensitivity_update(params, grads, ipt, unc, kinds, offsets, scores)

    fns: dict[str, Callable] = {}
    forced: dict[str, str | None] = {}
    errs: dict[str, float] = {}
    rows = []
    for be in backends:
        with forced_backend(be):
            try:
                _, impl = select(Problem("sensitivity", torch.device(device), dtype), REGISTRY)
                flat_i.zero_()
                flat_u.zero_()
                public()
                errs[be] = rel_err(scores)
            except Exception as e:  # BackendUnavailable, or a backend that fails on this machine
                rows += [error_row("sensitivity_update", f"{kind}[{be}]", shape, e, card)
                         for kind in ("fused_sensitivity_update", "kernel")]
                continue

        def kernel(impl=impl):
            scores.zero_()
            impl.fused_sensitivity_update(params, grads, ipt, unc, kinds, offsets, scores, 0.85, 0.85)
        fns[f"fused_sensitivity_update[{be}]"], forced[f"fused_sensitivity_update[{be}]"] = public, be
        fns[f"kernel[{be}]"], forced[f"kernel[{be}]"] = kernel, be
    try:
        tracker = SensitivityTracker(triplets)
        tracker.update()
        errs["auto"] = rel_err(tracker.scores)
        fns["SensitivityTracker.update(auto)"] = tracker.update
    except Exception as e:
        rows.append(error_row("sensitivity_update", "SensitivityTracker.update(auto)", shape, e, card))
    peer_state: dict = {}
    fns["peft-style-loop"] = lambda: peft_style_sensitivity(triplets, peer_state)
    stats, errors = _time_all(timer, fns, forced)
    peer = _med(stats, "peft-style-loop")
    for name, st in stats.items():
        gbps = nbytes / (st[0] * 1e-3) / 1e9
        key = name[name.index("[") + 1:-1] if "[" in name else ("auto" if "auto" in name else None)
        rows.append(make_row("sensitivity_update", name, "alloc", shape, dtype, card, st, gbps=round(gbps, 1),
                             pct_of_peak=round(100 * gbps / peak_bw, 2), speedup_vs_peer=_ratio(peer, st[0], 3),
                             rel_err_vs_peer=errs.get(key, 0.0 if name == "peft-style-loop" else None),
                             bytes=nbytes))
    rows += [error_row("sensitivity_update", n, shape, e, card) for n, e in errors.items()]
    return rows


# ---- ShareLoRA accumulation ---------------------------------------------------------------------------
def bench_shared_accumulation(device: str = "cuda", timer: Timer | None = None, card: str = "", L: int = 32,
                              T: int = 4096, d: int = 4096, r: int = 16,
                              dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Forward + backward of L layers sharing one A (one input each): in-place accumulation into A.grad vs
    autograd's per-layer dA summed, without and with dx (without, the adapter GEMMs are all the backward does)."""
    from bench.bench_share import shared_stack
    timer = timer or do_bench_timer
    rows = []
    stacks = {acc: shared_stack(L, d, d, r, acc, device, dtype) for acc in ("inplace", "autograd")}
    for need_dx in (False, True):
        xs = [torch.randn(T, d, device=device, dtype=dtype, requires_grad=need_dx) for _ in range(L)]
        dys = [torch.randn(T, d, device=device, dtype=dtype) for _ in range(L)]

        def step(layers, xs=xs, dys=dys):
            def fn():
                _clear_grads(*layers, *xs)
                outs = [lay(x) for lay, x in zip(layers, xs)]
                torch.autograd.backward(outs, dys)
            return fn
        stats, errors = _time_all(timer, {k: step(v) for k, v in stacks.items()})
        shape = f"L{L}-T{T}-d{d}-r{r}" + ("-with-dx" if need_dx else "-no-dx")
        err = None
        ga = [stacks[k][0].lora_A.grad for k in ("inplace", "autograd")]
        if all(g is not None for g in ga):
            err = float((ga[0].float() - ga[1].float()).abs().max() / ga[1].float().abs().max().clamp_min(1e-30))
        ref = _med(stats, "autograd")
        for k, st in stats.items():
            rows.append(make_row("shared_a_grad_accumulation", k, "full", shape, dtype, card, st,
                                 ratio_vs_autograd=_ratio(st[0], ref), rel_err_vs_autograd=err))
        rows += [error_row("shared_a_grad_accumulation", n, shape, e, card) for n, e in errors.items()]
        del xs, dys
    return rows


# ---- MoE-LoRA -----------------------------------------------------------------------------------------
def bench_moe(device: str = "cuda", timer: Timer | None = None, card: str = "", T: int = 8192, d: int = 4096,
              E: int = 8, r: int = 8, top_k: int = 2, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """MoE-LoRA layer forward + backward (dx, dA, dB, d router): gated-op layer vs a loop over experts vs a plain
    LoRA of rank E·r vs the frozen nn.Linear."""
    from bench.bench_moe import loop_forward
    from python_api.layers import LoRALinear
    from python_api.moe import MoELoRALinear
    timer = timer or do_bench_timer
    torch.manual_seed(0)
    base = _frozen_linear(d, d, device, dtype)
    moe = MoELoRALinear.from_linear(base, E, r, alpha=16, top_k=top_k)
    nn.init.normal_(moe.lora_B, std=0.01)
    lora = LoRALinear.from_linear(base, E * r, alpha=16)
    xs = [torch.randn(T, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    dy = torch.randn(T, d, device=device, dtype=dtype)
    moe_params = tuple(moe.parameters())
    fns = {"moe-gated-op": _step(moe, xs, dy), "moe-python-loop": _step(lambda z: loop_forward(moe, z), xs, dy,
                                                                        moe_params),
           f"plain-lora-r{E * r}": _step(lora, xs, dy), "nn.Linear-frozen": _step(base, xs, dy)}
    stats, errors = _time_all(timer, fns)
    shape = f"T{T}-d{d}-E{E}-r{r}-k{top_k}"
    floor, loop = _med(stats, "nn.Linear-frozen"), _med(stats, "moe-python-loop")
    rows = [make_row("moe_lora_linear", p, "full", shape, dtype, card, st,
                     overhead_vs_linear=_ratio(st[0] - floor, floor) if floor else None,
                     ratio_vs_python_loop=_ratio(st[0], loop)) for p, st in stats.items()]
    rows += [error_row("moe_lora_linear", n, shape, e, card) for n, e in errors.items()]
    return rows


# ---- layer alphas -------------------------------------------------------------------------------------
class _Blocks(nn.Module):
    """A weights-only stand-in for a decoder: ``layers.<i>.<proj>`` Linear modules, as layer_alphas finds them."""

    def __init__(self, L: int, d: int, ffn: int, device, dtype):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({name: nn.Linear(K, N, bias=False, device=device, dtype=dtype)
                           for name, (N, K) in _projection_shapes(d, ffn).items()}) for _ in range(L))


def hill_loop(lam) -> float:
    """The peer's fit of one spectrum: AlphaLoRA's published loop over x_min candidates (faithful window) in numpy.

    Args:
        lam: [n] eigenvalues σ² (any order).
    """
    import numpy as np
    lam = np.sort(np.asarray(lam, dtype=np.float64))
    lam = lam[lam > 0]
    counts, edges = np.histogram(np.log10(lam), bins=100)
    peak = 10 ** edges[int(np.argmax(counts))]
    lo, hi = np.log10(0.95 * peak), 1.5 * peak               # the published code's log10/linear mix-up, kept
    best_d, best_a = 1.0, 0.0
    for i in range(len(lam) - 1):
        xmin = lam[i]
        if xmin < lo or xmin > hi:
            continue
        tail = lam[i:]
        m = len(tail)
        a = 1 + m / np.sum(np.log(tail / xmin))
        if not (a > 1 and math.isfinite(a)):
            continue
        dist = float(np.max(np.abs(1 - (tail / xmin) ** (1 - a) - np.arange(m) / m)))
        if dist < best_d:
            best_d, best_a = dist, float(a)
    return best_a


def peer_layer_alphas(model: nn.Module) -> list[float]:
    """weightwatcher-like: one svdvals (fp32) per matrix, then a Python-loop Hill fit per matrix on the host."""
    from python_api.allocators.alphalora import target_linears
    per: dict[int, list[float]] = {}
    for _, li, m in target_linears(model):
        lam = torch.linalg.svdvals(m.weight.detach().float()).square()
        per.setdefault(li, []).append(hill_loop(lam.cpu().numpy()))
    return [sum(v) / len(v) for _, v in sorted(per.items())]


def _alpha_config(timer: Timer, card: str, name: str, L: int, d: int, ffn: int, device, dtype) -> list[dict]:
    from python_api.allocators.alphalora import layer_alphas, target_linears
    torch.manual_seed(0)
    model = _Blocks(L, d, ffn, device, dtype)
    mats = [m.weight.detach() for _, _, m in target_linears(model)]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for w in mats:
        groups.setdefault(tuple(w.shape), []).append(w)
    shape = f"{name}: {len(mats)} matrices (L{L}, d{d}, ffn{ffn})"
    out: dict[str, list[float]] = {}

    def ours(method, dt, key):
        def fn():
            out[key] = layer_alphas(model, method=method, dtype=dt)
        return fn

    def peer():
        out["peer"] = peer_layer_alphas(model)

    def floor():
        for ws in groups.values():
            torch.linalg.svdvals(torch.stack(ws).float())
    fns = {"layer_alphas[gram-fp64]": ours("gram", torch.float64, "gram"),
           "layer_alphas[svd-fp32]": ours("svd", torch.float32, "svd"),
           "svdvals+python-loop-hill(weightwatcher-like)": peer,
           "torch.svdvals-only(batched-fp32)": floor}
    stats, errors = _time_all(timer, fns)
    base = _med(stats, "svdvals+python-loop-hill(weightwatcher-like)")
    rows = []
    for p, st in stats.items():
        key = "gram" if "gram" in p else "svd" if "svd-fp32" in p else None
        diff = None
        if key in out and "peer" in out:
            diff = max(abs(a - b) for a, b in zip(out[key], out["peer"]))
        rows.append(make_row("layer_alphas", p, "alloc", shape, dtype, card, st, speedup_vs_peer=_ratio(base, st[0], 3),
                             max_abs_alpha_diff_vs_peer=diff, matrices=len(mats)))
    return rows + [error_row("layer_alphas", n, shape, e, card) for n, e in errors.items()]


def bench_alphas(device: str = "cuda", timer: Timer | None = None, card: str = "",
                 configs: tuple[tuple[str, int, int, int], ...] = (("MiniLM-L6-like", 6, 384, 1536),
                                                                    ("32L-d512-ffn1408", 32, 512, 1408)),
                 dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Layer alphas of L × 7 matrices per config (name, L, d, ffn): ours (gram fp64, svd fp32; batched per shape on
    ``device``) vs the per-matrix peer, and batched svdvals alone. Default timer: :func:`budget_timer` (calls of
    0.1–10 s). 7B dims (4096/11008) are left out: one fp64 eigendecomposition per 4096² matrix takes seconds."""
    timer = timer or budget_timer
    rows = []
    for name, L, d, ffn in configs:
        rows += _alpha_config(timer, card, name, L, d, ffn, device, dtype)
        _free(device)
    return rows


# ---- the suite ----------------------------------------------------------------------------------------
FAMILIES: dict[str, tuple[Callable[..., list[dict]], str]] = {  # name: (function, result file key)
    "training": (bench_training_shape, "gated"),
    "token_gate": (bench_token_gate, "gated"),
    "masked": (bench_masked, "gated"),
    "decode": (bench_decode, "gated"),
    "sensitivity": (bench_sensitivity, "kernels"),
    "share": (bench_shared_accumulation, "kernels"),
    "moe": (bench_moe, "kernels"),
    "alpha": (bench_alphas, "kernels"),
}


def card_tag(card: str) -> str:
    return card.replace(" ", "_").replace("/", "_")


def _free(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def run_suite(device: str, card: str, only=None, timer: Timer | None = None, sizes: dict | None = None,
              results_dir: str | None = None, out_dir: str | None = None, budget_s: float | None = None,
              log: Callable[[str], None] = print, suffix: str = "") -> dict[str, list[dict]]:
    """Runs the families (``only``: names of FAMILIES, default all) in order; writes each result file after every
    family (a killed run keeps what finished) and copies it to ``out_dir``. ``sizes``: per-family kwargs overriding
    the defaults; ``budget_s``: families that would start after this many seconds are recorded as skipped;
    ``suffix`` is appended to the result file names. Returns {"gated": rows, "kernels": rows}."""
    sizes = sizes or {}
    names = list(only or FAMILIES)
    tag = card_tag(card)
    files = {"gated": f"gated_gpu_{tag}{suffix}", "kernels": f"kernels_gpu_{tag}{suffix}"}
    rows: dict[str, list[dict]] = {"gated": [], "kernels": []}
    tflops, gbps = peaks_for(card)
    seconds: dict[str, float] = {}
    meta = {"card": card, "peak_tflops": tflops, "peak_gbps": gbps, "peak_source": "PERFORMANCE.md (H100) / PEAKS",
            "timer": getattr(timer, "__name__", "do_bench (alpha: budget_timer)"), "family_seconds": seconds}
    t_start = time.perf_counter()
    for name in names:
        fn, key = FAMILIES[name]
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            rows[key].append({"op": name, "provider": "-", "device": card,
                              "error": f"skipped: suite time budget of {budget_s:.0f} s spent"})
            continue
        kwargs = dict(sizes.get(name, {}))
        if timer is not None:
            kwargs["timer"] = timer
        t0 = time.perf_counter()
        try:
            rows[key] += fn(device, card=card, **kwargs)
        except Exception as e:  # the family failed before producing rows: record why, run the next one
            rows[key].append(error_row(name, "-", "-", e, card))
        seconds[name] = round(time.perf_counter() - t0, 2)
        log(f"[bench_gpu] {name}: {seconds[name]:.1f} s")
        _free(device)
        path = write_results(rows[key], files[key], meta, directory=results_dir)
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            for ext in (".json", ".csv"):
                shutil.copy(path[:-len(".json")] + ext, out_dir)
    return rows


# ``lora-kernels bench --quick`` on a GPU: every family at a fraction of its size (rows go to *_quick files).
QUICK_SIZES = {
    "training": {"T": 2048, "d": 1024},
    "token_gate": {"T": 2048, "d": 1024},
    "masked": {"T": 2048, "d": 1024, "configs": ((16, 4), (16, 16))},
    "decode": {"d": 1024, "tokens": (1, 16)},
    "sensitivity": {"layers": 4},
    "share": {"L": 8, "T": 1024, "d": 1024},
    "moe": {"T": 2048, "d": 1024},
    "alpha": {"configs": (("MiniLM-L6-like", 6, 384, 1536),)},
}


def run(quick: bool = False) -> list[dict]:
    """The suite on the first CUDA device (``quick``: QUICK_SIZES, a 120 s budget); [] when there is none."""
    if not torch.cuda.is_available():
        print("bench_gpu: skipped: no CUDA device")
        return []
    card = torch.cuda.get_device_name()
    rows = run_suite("cuda", card, sizes=QUICK_SIZES if quick else None, budget_s=120.0 if quick else 360.0,
                     suffix="_quick" if quick else "")
    return rows["gated"] + rows["kernels"]


def main(argv=None):
    ap = argparse.ArgumentParser(description="GPU benchmarks of every kernel family (needs CUDA)")
    ap.add_argument("--only", nargs="+", choices=list(FAMILIES), metavar="NAME",
                    help=f"run only these families: {', '.join(FAMILIES)}")
    ap.add_argument("--out", default=None, metavar="DIR", help="also copy the result files into this folder")
    ap.add_argument("--budget-s", type=float, default=360.0,
                    help="start no family after this many seconds (default 360)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device visible to torch (the GPU benchmarks need one; CPU benchmarks: "
              "python -m bench.run_all)", file=sys.stderr)
        raise SystemExit(2)
    card = torch.cuda.get_device_name()
    rows = run_suite("cuda", card, only=args.only, out_dir=args.out, budget_s=args.budget_s)
    allrows = rows["gated"] + rows["kernels"]
    print(format_table([r for r in allrows if "median" in r]))
    for r in allrows:
        if "error" in r:
            print("ERROR", r)


if __name__ == "__main__":
    main()
