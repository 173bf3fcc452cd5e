"""The ``cpu`` backend of the gated LoRA linear: the GEMM layouts CPU BLAS runs fastest, same contract as the
reference. Auto's first choice for CPU tensors (:mod:`lora_kernels.dispatch`); ``LORA_KERNELS_BACKEND=torch`` runs
the reference instead.

:mod:`.reference` stays the readable oracle; this module computes exactly its products (tested against it in
tests/lora_kernels/gated_lora/test_cpu.py), choosing for each the operand layout that is fast on CPU. Measured on
the 2-core AMD EPYC (AVX2, no native bf16) with torch 2.13, interleaved, T = 4096 (fp32) / 1024 (bf16) tokens,
MiniLM shapes K×N = 384×1536 and 1536×384, r = 8:

- dB = s·dyᵀ·(H⊙G) as ``(Hᵀ·dy)ᵀ``: the [N, R] output with the long T as inner dimension is MKL's slow case:
  215 → 56 ms fp32, 17 → 2 ms bf16.
- bf16/fp16 dx = dy·W with W transposed into a contiguous [K, N] copy first (a copy of N·K elements per call):
  oneDNN's bf16 GEMM with a row-major right operand runs 6× slower on AVX2 (2269 → 339 ms) than with a
  transposed one. The frozen ``nn.Linear`` backward under autocast pays the slow form.
- the expand ``y += s·(H⊙G)·Bᵀ`` and dZ = s·dy·B with B transposed into a contiguous [R, N] copy, s folded into
  that small copy (in B's fp32 before the cast): bf16 expand 166 → 65 ms; dZ 60 → 44 ms fp32.
Nothing else is stored for backward than the reference stores (x and h; the dropout mask is regenerated).
"""
from __future__ import annotations

import torch

from ..dispatch import Problem
from .reference import dropout_mask, gate_grad

_HALF = (torch.float16, torch.bfloat16)


def supports(p: Problem) -> tuple[bool, str]:
    if p.device.type != "cpu":
        return False, f"the cpu backend runs on CPU tensors only, got {p.device.type}"
    return True, "CPU GEMM layouts (lora_kernels.gated_lora.cpu)"


def _scaled_bt(lora_b: torch.Tensor, scale: float, cd: torch.dtype) -> torch.Tensor:
    """s·Bᵀ as a contiguous [R, N] in the compute dtype (scaled before the cast: one rounding, as s·(…) would)."""
    return (lora_b.t() * scale).to(cd).contiguous() if scale != 1.0 else lora_b.t().to(cd).contiguous()


def gated_lora_forward(x, weight, bias, lora_a, lora_b, scale, gate=None, dropout_p=0.0, seed=0):
    """``(y [T, N] in x.dtype, h = dropout(x)·Aᵀ [T, R])``, as :func:`.reference.gated_lora_forward`."""
    cd = x.dtype
    xd = x * dropout_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device, cd) if dropout_p > 0 else x
    h = xd @ lora_a.to(cd).t()                                                   # [T, R]
    y = torch.addmm(bias.to(cd), x, weight.t()) if bias is not None else x @ weight.t()
    hg = h if gate is None else h * gate.to(cd)
    y.addmm_(hg, _scaled_bt(lora_b, scale, cd))                                 # [T, N]
    return y, h


def gated_lora_backward(dy, x, weight, lora_a, lora_b, h, scale, gate=None, dropout_p=0.0, seed=0,
                        needs=(True, True, True, True), accum_a=None, accum_b=None):
    """``(dx, dA, dB, dG)`` as :func:`.reference.gated_lora_backward` (same ``needs`` / accumulators)."""
    need_x, need_a, need_b, need_g = needs
    cd = dy.dtype
    hc = h.to(cd)
    g = gate.to(cd) if gate is not None else None
    mask = None
    if dropout_p > 0 and (need_x or need_a):
        mask = dropout_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device, cd)
    dz = dy @ _scaled_bt(lora_b, scale, cd).t() if (need_x or need_a or need_g) else None   # [T, R] = s·dy·B
    dh = dz if g is None or dz is None else dz * g
    dx = da = db = dg = None
    if need_x:
        a = lora_a.to(cd)
        # bf16/fp16: the transposed copy of W is what makes oneDNN take its fast kernel (module docstring).
        w = weight.t().contiguous().t() if cd in _HALF else weight
        if mask is not None:
            dx = torch.addmm((dh @ a).mul_(mask), dy, w)
        else:
            dx = (dy @ w).addmm_(dh, a)
    if need_a:
        xd = x * mask if mask is not None else x
        if accum_a is not None and accum_a.dtype == cd:
            accum_a.addmm_(dh.t(), xd)
        elif accum_a is not None:
            accum_a.add_((dh.t() @ xd).to(accum_a.dtype))
        else:
            da = (dh.t() @ xd).to(lora_a.dtype)                                 # [R, K]
    if need_b:
        hg = hc if g is None else hc * g
        if accum_b is not None and accum_b.dtype == cd:
            accum_b.t().addmm_(hg.t(), dy, alpha=scale)                         # writes accum_b through the view
        else:
            dbt = hg.t() @ dy                                                    # [R, N]: the fast layout
            if accum_b is not None:
                accum_b.t().add_(dbt.to(accum_b.dtype), alpha=scale)
            else:
                db = dbt.mul_(scale).t().to(lora_b.dtype)                        # [N, R] (a transposed view)
    if need_g and gate is not None:
        dg = gate_grad(dz, hc, gate)
    return dx, da, db, dg
