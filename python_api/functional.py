"""The gated LoRA linear, a ``torch.library`` custom op (:mod:`lora_kernels.ops`) dispatched per call to the
torch / Triton / CUDA backends, so ``torch.compile`` traces it as one node with its fake implementation (eager
calls run the same bodies through a plain autograd Function: ``lora_kernels.ops.gated_lora``).

    y = x Wᵀ + b + s · ((dropout(x) Aᵀ) ⊙ G) Bᵀ          (ALGORITHMS.md §1)

Shapes: x [..., K]; weight [N, K]; bias [N]; lora_a [R, K]; lora_b [N, R]; gate None | [R] | [T, R]
with T = x.numel() // K.
"""
from __future__ import annotations

import torch

from lora_kernels import gated
from lora_kernels import ops as _ops  # registers torch.ops.lora_kernels.*
from lora_kernels.checks import check_gated_lora_args


def new_dropout_seed() -> int:
    # Drawn from torch's CPU generator: reproducible under torch.manual_seed, no device sync.
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _compile_accum(lora_a, lora_b, accum_a, accum_b):
    # AOTAutograd cannot yet partition a graph input that only the backward mutates ("Node ... was invalid, but
    # is output"). When the buffer is the parameter's own .grad (ShareLoRA's in-place mode) autograd's
    # AccumulateGrad adds the per-layer gradient into that same .grad: same values, one temporary per layer.
    for name, buf, p in (("accum_a", accum_a, lora_a), ("accum_b", accum_b, lora_b)):
        if buf is not None and buf is not p.grad:
            raise NotImplementedError(f"{name} under torch.compile: only a buffer that is the matrix's own .grad "
                                      "is supported (it then takes the autograd path)")
    return None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    gate: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    active: torch.Tensor | None = None,
    seed: int | None = None,
    accum_a: torch.Tensor | None = None,
    accum_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gated LoRA linear ``y = x Wᵀ + b + s·((dropout(x) Aᵀ) ⊙ G) Bᵀ``; W and b are treated as frozen.

    Args:
        x: [..., K] input.
        weight: [N, K] frozen base weight (same dtype as x).
        bias: [N] or None.
        lora_a: [R, K] down projection.  lora_b: [N, R] up projection.
        scale: s (usually alpha / r).
        gate: None, per-rank [R] (0/1 mask or singular values) or per-token [T, R], T = x.numel() // K.
        dropout_p: dropout on the LoRA input, applied only when ``training``; regenerated from a seed.
        active: optional precomputed ``active_ranks(gate)`` for a fixed per-rank gate (layers cache it).
        seed: dropout seed; drawn from torch's generator when None.
        accum_a, accum_b: optional fp32 buffers shaped like lora_a / lora_b (ShareLoRA): backward adds this
            call's dA / dB into them in place and returns no gradient for lora_a / lora_b through autograd.
    Returns:
        [..., N] in x's dtype. Differentiable w.r.t. x, lora_a, lora_b and gate.
    """
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        # Run the op in the autocast dtype, then with autocast off so the backends see one dtype.
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(x, weight, bias, lora_a, lora_b, scale, gate, dropout_p, training,
                               active=active, seed=seed, accum_a=accum_a, accum_b=accum_b)
    if torch.compiler.is_compiling() and (accum_a is not None or accum_b is not None):
        accum_a, accum_b = _compile_accum(lora_a, lora_b, accum_a, accum_b)
    gate_kind = check_gated_lora_args(x, weight, bias, lora_a, lora_b, gate, dropout_p, scale)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad, but the gated LoRA op treats the base layer as frozen and "
                             f"never computes its gradient: call {name}.requires_grad_(False) (LoRALinear does)")
    K, N = weight.shape[1], weight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)                                            # [T, K]
    p = float(dropout_p) if training else 0.0
    seed_t = None
    if p > 0:
        # A tensor, drawn exactly as new_dropout_seed draws it: under torch.compile a fresh seed per step then
        # neither breaks the graph (.item()) nor recompiles it (a new int constant).
        seed_t = torch.randint(0, 2**31 - 1, (1,)) if seed is None else torch.tensor([int(seed)], dtype=torch.int64)
    if gate_kind == "rank" and not gate.requires_grad and active is None:
        # Compaction reads the mask on the host (data-dependent shape): skipped under torch.compile, where the
        # 0/1 gate multiplies the masked ranks' terms by exactly zero instead (same values and gradients).
        if not torch.compiler.is_compiling():
            active = gated.active_ranks(gate)
    elif gate_kind != "rank" or gate.requires_grad:
        active = None  # compaction would drop the switched-off ranks' gate gradient (ALGORITHMS.md §1)
    y = _ops.gated_lora(x2, weight, bias, lora_a, lora_b, gate, float(scale), p, seed_t, active, accum_a, accum_b)
    return y.reshape(*lead, N)
