"""The gated LoRA linear as a torch.autograd Function, dispatched to the torch / Triton / CUDA backends.

    y = x Wᵀ + b + s · ((dropout(x) Aᵀ) ⊙ G) Bᵀ          (ALGORITHMS.md §1)

Shapes: x [..., K]; weight [N, K]; bias [N]; lora_a [R, K]; lora_b [N, R]; gate None | [R] | [T, R]
with T = x.numel() // K.
"""
from __future__ import annotations

import torch

from lora_kernels import gated
from lora_kernels.checks import check_gated_lora_args


def new_dropout_seed() -> int:
    # Drawn from torch's CPU generator: reproducible under torch.manual_seed, no device sync.
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


class GatedLoRAFunction(torch.autograd.Function):
    """Autograd wrapper on 2-D inputs. ``active`` (optional) lists the ranks a fixed per-rank gate keeps;
    the backends then run on the compacted rank, and the gradients of the other ranks are zero."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, gate, scale, dropout_p, seed, active, accum_a, accum_b):
        # x [T, K]
        T, R, N = x.shape[0], lora_a.shape[0], weight.shape[0]
        a, b, g = lora_a, lora_b, gate
        if active is not None:
            a, b, g = lora_a.index_select(0, active), lora_b.index_select(1, active), gate.index_select(0, active)
        ctx.scale, ctx.dropout_p, ctx.seed, ctx.full_rank = scale, dropout_p, seed, R
        ctx.has_bias = bias is not None
        ctx.accum = (accum_a, accum_b)  # not saved tensors: they are written, not read, by backward
        if T == 0 or a.shape[0] == 0:
            # Empty batch or every rank masked: the LoRA term vanishes, only the frozen base runs.
            ctx.backend = None
            h = x.new_zeros(T, a.shape[0], dtype=torch.float32)
            y = torch.nn.functional.linear(x, weight, bias) if T else x.new_empty(0, N)
        else:
            ctx.backend, impl = gated.select_backend(x, g, dropout_p)
            y, h = impl.gated_lora_forward(x, weight, bias, a, b, scale, g, dropout_p, seed)
        ctx.save_for_backward(x, weight, a, b, h, g, active)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, a, b, h, g, active = ctx.saved_tensors
        need_x, _, _, need_a, need_b, need_g = ctx.needs_input_grad[:6]
        if ctx.backend is None:
            dx = dy @ weight.to(dy.dtype) if need_x else None
            da = db = dg = None
            if x.shape[0] == 0 or a.shape[0] == 0:
                da = torch.zeros_like(a) if need_a else None
                db = torch.zeros_like(b) if need_b else None
                dg = torch.zeros_like(g) if need_g and g is not None else None
        else:
            impl = gated.REGISTRY[ctx.backend]
            # Compacted ranks cannot be accumulated in place by the kernel (rows are scattered): get the
            # compact gradient and index_add it below.
            acc_a, acc_b = ctx.accum if active is None else (None, None)
            dx, da, db, dg = impl.gated_lora_backward(
                dy.contiguous(), x, weight, a, b, h, ctx.scale, g, ctx.dropout_p, ctx.seed,
                (need_x, need_a, need_b, need_g), accum_a=acc_a, accum_b=acc_b)
        accum_a, accum_b = ctx.accum
        if active is not None:
            R = ctx.full_rank
            if da is not None:
                if accum_a is not None:
                    accum_a.index_add_(0, active, da.to(accum_a.dtype))
                else:
                    da = da.new_zeros(R, da.shape[1]).index_copy_(0, active, da)
            if db is not None:
                if accum_b is not None:
                    accum_b.index_add_(1, active, db.to(accum_b.dtype))
                else:
                    db = db.new_zeros(db.shape[0], R).index_copy_(1, active, db)
        if accum_a is not None:
            da = None
        if accum_b is not None:
            db = None
        return dx, None, None, da, db, dg, None, None, None, None, None, None


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
    gate_kind = check_gated_lora_args(x, weight, bias, lora_a, lora_b, gate, dropout_p, scale)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad, but the gated LoRA op treats the base layer as frozen and "
                             f"never computes its gradient: call {name}.requires_grad_(False) (LoRALinear does)")
    K, N = weight.shape[1], weight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)                                            # [T, K]
    p = float(dropout_p) if training else 0.0
    if p > 0 and seed is None:
        seed = new_dropout_seed()
    if gate_kind == "rank" and not gate.requires_grad and active is None:
        active = gated.active_ranks(gate)
    elif gate_kind != "rank" or gate.requires_grad:
        active = None  # compaction would drop the switched-off ranks' gate gradient (ALGORITHMS.md §1)
    y = GatedLoRAFunction.apply(x2, weight, bias, lora_a, lora_b, gate, float(scale), p, int(seed or 0), active,
                                accum_a, accum_b)
    return y.reshape(*lead, N)
