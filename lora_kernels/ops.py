"""The gated LoRA linear as ``torch.library`` custom ops, so ``torch.compile`` traces it without graph breaks.

    torch.ops.lora_kernels.gated_lora_forward(x, weight, bias, lora_a, lora_b, gate, scale, dropout_p, seed,
                                              active, accum_a, accum_b) -> (y [T, N], h [T, R'])
    torch.ops.lora_kernels.gated_lora_backward(dy, x, weight, lora_a, lora_b, h, gate, scale, dropout_p, seed,
                                               active, needs, accum_a!, accum_b!) -> (dx, dA, dB, dG)

2-D tensors only (``python_api.lora_linear`` validates and flattens). ``active`` [R'] (int64, optional) lists the
ranks a fixed per-rank gate keeps; the backend runs on the compacted rank R' and dA / dB come back full size with
zeros at the other ranks. ``seed`` is an int64 tensor [1] (or None without dropout): a tensor, not an int, so a
fresh seed per step neither breaks the graph (``.item()``) nor recompiles it (a new constant).
``accum_a`` / ``accum_b`` (fp32/fp64 buffers shaped like lora_a / lora_b, ShareLoRA) are declared mutated by the
backward op, which adds this call's dA / dB into them; the forward op only carries them to the autograd context.
A gradient that is not needed, or that went into a buffer, comes back as an empty [0] tensor (custom ops cannot
return None); the autograd formula turns those into None.

The backend (torch / Triton / CUDA) is picked at run time inside the implementations, per call; backward picks
again from the same problem description, so both passes run on the same backend.
Importing this module registers the ops; it imports neither triton nor the compiled module.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import gated

_NS = "lora_kernels"


def _scatter_ranks(grad, dim, active, full_shape, accum):
    """A compacted-rank gradient back to the full rank: added into ``accum`` (returns None) or scattered
    into zeros of ``full_shape``; the other ranks' gradient is zero."""
    if grad is None:
        return None
    if accum is not None:
        accum.index_add_(dim, active, grad.to(accum.dtype))
        return None
    return grad.new_zeros(full_shape).index_copy_(dim, active, grad)


def _h_dtype(x: Tensor) -> torch.dtype:
    # One dtype for h whatever the backend (torch keeps x's dtype, Triton writes fp32): fake and real must agree.
    return torch.promote_types(x.dtype, torch.float32)


def _compact(lora_a: Tensor, lora_b: Tensor, gate: Optional[Tensor], active: Optional[Tensor]):
    if active is None:
        return lora_a, lora_b, gate
    g = gate.index_select(0, active) if gate is not None else None
    return lora_a.index_select(0, active), lora_b.index_select(1, active), g


def _seed(seed: Optional[Tensor]) -> int:
    return int(seed.item()) if seed is not None else 0


def _none_grad(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return like.new_empty(0, dtype=dtype or like.dtype)


@torch.library.custom_op(f"{_NS}::gated_lora_forward", mutates_args=())
def gated_lora_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                       gate: Optional[Tensor], scale: float, dropout_p: float, seed: Optional[Tensor],
                       active: Optional[Tensor], accum_a: Optional[Tensor], accum_b: Optional[Tensor],
                       ) -> tuple[Tensor, Tensor]:
    """x [T, K] -> (y [T, N] in x.dtype, h = dropout(x) A'ᵀ [T, R'] in fp32, fp64 for fp64 x)."""
    return _forward_impl(x, weight, bias, lora_a, lora_b, gate, scale, dropout_p, seed, active)


def _forward_impl(x, weight, bias, lora_a, lora_b, gate, scale, dropout_p, seed, active):
    T, N = x.shape[0], weight.shape[0]
    a, b, g = _compact(lora_a, lora_b, gate, active)
    if T == 0 or a.shape[0] == 0:
        # Empty batch or every rank masked: the LoRA term vanishes, only the frozen base runs.
        y = torch.nn.functional.linear(x, weight, bias) if T else x.new_empty(0, N)
        return y, x.new_zeros(T, a.shape[0], dtype=_h_dtype(x))
    _, impl = gated.select_backend(x, g, dropout_p)
    y, h = impl.gated_lora_forward(x, weight, bias, a, b, scale, g, dropout_p, _seed(seed))
    return y.contiguous(), h.to(_h_dtype(x)).contiguous()


@gated_lora_forward.register_fake
def _(x, weight, bias, lora_a, lora_b, gate, scale, dropout_p, seed, active, accum_a, accum_b):
    r = active.shape[0] if active is not None else lora_a.shape[0]
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], r, dtype=_h_dtype(x))


@torch.library.custom_op(f"{_NS}::gated_lora_backward", mutates_args=("accum_a", "accum_b"))
def gated_lora_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, h: Tensor,
                        gate: Optional[Tensor], scale: float, dropout_p: float, seed: Optional[Tensor],
                        active: Optional[Tensor], needs: list[bool], accum_a: Optional[Tensor],
                        accum_b: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx [T, K], dA [R, K], dB [N, R], dG like gate); each is [0] when not needed or accumulated."""
    dx, da, db, dg = _backward_impl(dy, x, weight, lora_a, lora_b, h, gate, scale, dropout_p, seed, active, needs,
                                    accum_a, accum_b)
    return (dx.contiguous() if dx is not None else _none_grad(dy),
            da.to(lora_a.dtype).contiguous() if da is not None else _none_grad(lora_a),
            db.to(lora_b.dtype).contiguous() if db is not None else _none_grad(lora_b),
            dg.to(gate.dtype).contiguous() if dg is not None else _none_grad(gate if gate is not None else dy))


def _backward_impl(dy, x, weight, lora_a, lora_b, h, gate, scale, dropout_p, seed, active, needs, accum_a, accum_b):
    """The backward op's body: (dx, dA, dB, dG), each None when not needed or accumulated into its buffer."""
    need_x, need_a, need_b, need_g = needs
    need_g = need_g and gate is not None
    if need_g and active is not None:
        raise ValueError("needs asks for the gate gradient but active is set: dG of a switched-off rank is generally "
                         "non-zero (ALGORITHMS.md §1), so a gate that needs a gradient must not be compacted")
    a, b, g = _compact(lora_a, lora_b, gate, active)
    if x.shape[0] == 0 or a.shape[0] == 0:
        dx = dy @ weight.to(dy.dtype) if need_x else None
        # The LoRA term was zero: its gradients are zero (accumulating zeros is a no-op).
        da = torch.zeros_like(lora_a) if need_a and accum_a is None else None
        db = torch.zeros_like(lora_b) if need_b and accum_b is None else None
        dg = torch.zeros_like(gate) if need_g else None
    else:
        _, impl = gated.select_backend(x, g, dropout_p)
        # Compacted ranks cannot be accumulated in place by the kernel (rows are scattered): get the compact
        # gradient and index_add it below.
        acc_a, acc_b = (accum_a, accum_b) if active is None else (None, None)
        dx, da, db, dg = impl.gated_lora_backward(
            dy.contiguous(), x, weight, a, b, h, scale, g, dropout_p, _seed(seed),
            (need_x, need_a, need_b, need_g), accum_a=acc_a, accum_b=acc_b)
        if active is not None:
            da = _scatter_ranks(da, 0, active, lora_a.shape, accum_a)
            db = _scatter_ranks(db, 1, active, lora_b.shape, accum_b)
    return dx, da, db, dg


@gated_lora_backward.register_fake
def _(dy, x, weight, lora_a, lora_b, h, gate, scale, dropout_p, seed, active, needs, accum_a, accum_b):
    need_x, need_a, need_b, need_g = needs
    return (dy.new_empty(x.shape) if need_x else _none_grad(dy),
            lora_a.new_empty(lora_a.shape) if need_a and accum_a is None else _none_grad(lora_a),
            lora_b.new_empty(lora_b.shape) if need_b and accum_b is None else _none_grad(lora_b),
            gate.new_empty(gate.shape) if need_g and gate is not None else _none_grad(gate if gate is not None
                                                                                      else dy))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, gate, scale, dropout_p, seed, active, accum_a, accum_b = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], gate, seed, active)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.mark_non_differentiable(output[1])
    # Not saved tensors: backward writes them, and other layers sharing a buffer bump its version in between.
    ctx.accum = (accum_a, accum_b)


def _backward(ctx, dy, dh):
    x, weight, lora_a, lora_b, h, gate, seed, active = ctx.saved_tensors
    need_x, need_a, need_b, need_g = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
    accum_a, accum_b = ctx.accum
    dx, da, db, dg = torch.ops.lora_kernels.gated_lora_backward(
        dy, x, weight, lora_a, lora_b, h, gate, ctx.scale, ctx.dropout_p, seed, active,
        [need_x, need_a, need_b, need_g], accum_a if need_a else None, accum_b if need_b else None)
    return (dx if need_x else None, None, None,
            da if need_a and accum_a is None else None,
            db if need_b and accum_b is None else None,
            dg if need_g and gate is not None else None,
            None, None, None, None, None, None)


gated_lora_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerGatedLoRA(torch.autograd.Function):
    """The same forward / backward bodies as the custom ops, without the ``torch.library`` dispatch layers.

    Measured on the 2-core CPU (fwd+bwd of a 16×16 layer, r=16): the custom-op route cost ≈0.66 ms more per call
    than PEFT's layer (schema default-filling and the autograd wrapper, twice per step), i.e. ~24 ms per step for
    MiniLM's 36 adapted linears. Eager calls take this route; torch.compile keeps the custom op (one graph node).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, gate, scale, dropout_p, seed, active, accum_a, accum_b):
        y, h = _forward_impl(x, weight, bias, lora_a, lora_b, gate, scale, dropout_p, seed, active)
        ctx.save_for_backward(x, weight, lora_a, lora_b, h, gate, seed, active)
        ctx.scale, ctx.dropout_p, ctx.accum = scale, dropout_p, (accum_a, accum_b)
        ctx.mark_non_differentiable(h)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        x, weight, lora_a, lora_b, h, gate, seed, active = ctx.saved_tensors
        need_x, need_a, need_b, need_g = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
        accum_a, accum_b = ctx.accum
        dx, da, db, dg = _backward_impl(dy, x, weight, lora_a, lora_b, h, gate, ctx.scale, ctx.dropout_p, seed,
                                        active, (need_x, need_a, need_b, need_g),
                                        accum_a if need_a else None, accum_b if need_b else None)
        return (dx if need_x else None, None, None,
                da.to(lora_a.dtype) if da is not None and need_a else None,
                db.to(lora_b.dtype) if db is not None and need_b else None,
                dg.to(gate.dtype) if dg is not None and need_g else None,
                None, None, None, None, None, None)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def gated_lora(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
               gate: Optional[Tensor], scale: float, dropout_p: float, seed: Optional[Tensor],
               active: Optional[Tensor], accum_a: Optional[Tensor], accum_b: Optional[Tensor]) -> Tensor:
    """``y`` of :func:`gated_lora_forward` (same arguments), differentiable. Plain eager tensors take
    :class:`_EagerGatedLoRA`; under torch.compile, or with tensor subclasses (fake, functional, DTensor) the
    registered custom op runs, so tracing sees one node with its fake implementation."""
    if not torch.compiler.is_compiling() and all(t is None or type(t) in _PLAIN
                                                 for t in (x, weight, bias, lora_a, lora_b, gate)):
        return _EagerGatedLoRA.apply(x, weight, bias, lora_a, lora_b, gate, scale, dropout_p, seed, active,
                                     accum_a, accum_b)[0]
    return torch.ops.lora_kernels.gated_lora_forward(x, weight, bias, lora_a, lora_b, gate, scale, dropout_p, seed,
                                                     active, accum_a, accum_b)[0]
