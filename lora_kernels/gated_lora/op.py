"""The gated LoRA linear, whole: validation, the compaction decision, backend choice, the custom op and autograd.

    y = x Wᵀ + b + s · ((dropout(x) Aᵀ) ⊙ G) Bᵀ          (docs/ALGORITHMS.md §1)

Shapes: x [..., K]; weight [N, K]; bias [N]; lora_a [R, K]; lora_b [N, R]; gate None | [R] | [T, R]
with T = x.numel() // K.

The path of one call: :func:`lora_linear` validates every argument once (TypeError for a wrong type, ValueError
for a wrong value or shape, each naming the argument) and decides compaction once (a fixed 0/1 per-rank gate runs
on its active ranks only); :func:`gated_lora` then takes either the plain autograd Function (eager, plain tensors)
or the ``torch.library`` custom op (torch.compile, tensor subclasses), whose bodies ask
:func:`lora_kernels.dispatch.select` for a backend per call. Backends (``reference``, ``triton``, ``cuda``) assume
valid input.

    torch.ops.lora_kernels.gated_lora_forward(x, weight, bias, lora_a, lora_b, gate, scale, dropout_p, seed,
                                              active, accum_a, accum_b) -> (y [T, N], h [T, R'])
    torch.ops.lora_kernels.gated_lora_backward(dy, x, weight, lora_a, lora_b, h, gate, scale, dropout_p, seed,
                                               active, needs, accum_a!, accum_b!) -> (dx, dA, dB, dG)

2-D tensors only at the op level. ``active`` [R'] (int64, optional) lists the ranks a fixed per-rank gate keeps;
the backend runs on the compacted rank R' and dA / dB come back full size with zeros at the other ranks. ``seed``
is an int64 tensor [1] (or None without dropout): a tensor, not an int, so a fresh seed per step neither breaks
the graph (``.item()``) nor recompiles it (a new constant). ``accum_a`` / ``accum_b`` (fp32/fp64 buffers shaped
like lora_a / lora_b, ShareLoRA) are declared mutated by the backward op, which adds this call's dA / dB into
them. A gradient that is not needed, or that went into a buffer, comes back from the custom op as an empty [0]
tensor (custom ops cannot return None); the autograd formula turns those into None.
Importing this module registers the ops; it imports neither triton nor the compiled module.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import codes
from ..dispatch import LazyBackend, Problem, reference_backend, select
from . import reference

_NS = "lora_kernels"


# ---- backends ------------------------------------------------------------------------------------------------
# Every backend implements, on valid 2-D tensors, ``supports(problem) -> (bool, reason)``,
# ``gated_lora_forward(x, weight, bias, lora_a, lora_b, scale, gate, dropout_p, seed) -> (y, h)`` and
# ``gated_lora_backward(dy, x, weight, lora_a, lora_b, h, scale, gate, dropout_p, seed, needs, accum_a, accum_b)
# -> (dx, dA, dB, dG)`` with exactly the semantics of :mod:`.reference`.
REGISTRY = {"torch": reference_backend(gated_lora_forward=reference.gated_lora_forward,
                                      gated_lora_backward=reference.gated_lora_backward),
            "cpu": LazyBackend(".cpu", __package__), "triton": LazyBackend(".triton", __package__),
            "cuda": LazyBackend(".cuda", __package__)}


def select_backend(x: Tensor, gate: Optional[Tensor], dropout_p: float):
    """``(name, implementation)`` for one call (:func:`lora_kernels.dispatch.select`)."""
    return select(Problem("gated_lora", x.device, x.dtype, x.shape[0], codes.gate_kind(gate), dropout_p > 0),
                  REGISTRY)


def active_ranks(gate: Tensor) -> Optional[Tensor]:
    """Indices of the non-zero entries of a per-rank gate, or None when every rank is on.

    Compaction is exact only for a gate that needs no gradient: dG_i is generally non-zero at a switched-off rank
    (docs/ALGORITHMS.md §1), so the gate of a gate that requires grad is never compacted. Reads the mask on the
    host (one sync); layers cache the result while the mask is unchanged.
    """
    idx = torch.nonzero(gate, as_tuple=False).flatten()
    return None if idx.numel() == gate.numel() else idx


# ---- validation (once, at the public boundary) ---------------------------------------------------------------
def check_tensor(name: str, t, *, dims: int | tuple[int, ...] | None = None, float_only: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None:
        allowed = (dims,) if isinstance(dims, int) else dims
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if float_only and t.dtype not in codes.FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got dtype {t.dtype}")


def _check_number(name: str, v, lo: float | None = None, hi: float | None = None, hi_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if (lo is not None and v < lo) or (hi is not None and (v >= hi if hi_open else v > hi)):
        raise ValueError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {v}")
    return float(v)


def check_gated_lora_args(x, weight, bias, lora_a, lora_b, gate, dropout_p, scale, *, seed=None, active=None,
                          accum_a=None, accum_b=None) -> str:
    """Validates the gated LoRA linear's arguments (x may have any leading shape); returns the gate kind
    (``"none"`` | ``"rank"`` | ``"token"``). Every error names the argument and the offending value."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim [..., K], got shape {tuple(x.shape)}")
    check_tensor("weight", weight, dims=2)
    check_tensor("lora_a", lora_a, dims=2)
    check_tensor("lora_b", lora_b, dims=2)
    N, K = weight.shape
    R = lora_a.shape[0]
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but weight expects K={K} "
                         f"(weight shape {tuple(weight.shape)})")
    if lora_a.shape[1] != K:
        raise ValueError(f"lora_a must be [R, K] = [R, {K}], got shape {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (N, R):
        raise ValueError(f"lora_b must be [N, R] = [{N}, {R}], got shape {tuple(lora_b.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dims=1)
        if bias.shape[0] != N:
            raise ValueError(f"bias must be [N] = [{N}], got shape {tuple(bias.shape)}")
    kind = "none"
    if gate is not None:
        check_tensor("gate", gate, dims=(1, 2))
        T = x.numel() // K if K else math.prod(x.shape[:-1])
        if gate.dim() == 1:
            if gate.shape[0] != R:
                raise ValueError(f"gate (per-rank mask/values) has length {gate.shape[0]}, expected R={R}")
            kind = "rank"
        else:
            if tuple(gate.shape) != (T, R):
                raise ValueError(f"gate (per-token) must be [T, R] = [{T}, {R}] with T = x.numel() // K, "
                                 f"got shape {tuple(gate.shape)}")
            kind = "token"
    _check_number("dropout_p", dropout_p, 0.0, 1.0, hi_open=True)
    _check_number("scale", scale)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise (TypeError if not isinstance(seed, int) or isinstance(seed, bool) else ValueError)(
            f"seed must be an int in [0, 2**63), got {seed!r}")
    tensors = {"weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b, "gate": gate,
               "accum_a": accum_a, "accum_b": accum_b}
    for name, t in tensors.items():
        if t is not None and isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must share one device")
    # Frozen weight/bias follow x's dtype; adapters may be fp32 master weights (mixed precision).
    for name in ("weight", "bias"):
        t = tensors[name]
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}: the frozen weight and bias must "
                            "match x's dtype (cast the layer, or use autocast)")
    if lora_a.dtype != lora_b.dtype:
        raise TypeError(f"lora_a ({lora_a.dtype}) and lora_b ({lora_b.dtype}) must share one dtype")
    for name, buf, shape in (("accum_a", accum_a, (R, K)), ("accum_b", accum_b, (N, R))):
        if buf is None:
            continue
        if isinstance(buf, GradSlot):
            # Bound at backward time to the parameter's .grad (made contiguous, in the parameter's dtype).
            if buf.param.dtype not in (torch.float32, torch.float64) or tuple(buf.param.shape) != shape:
                raise ValueError(f"{name} slot must be an fp32/fp64 parameter of shape {list(shape)}, got "
                                 f"{buf.param.dtype} {tuple(buf.param.shape)}")
            continue
        check_tensor(name, buf, dims=2)
        if buf.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be an fp32 (or fp64) buffer, got dtype {buf.dtype}")
        if tuple(buf.shape) != shape:
            raise ValueError(f"{name} must have the shape of its matrix {list(shape)}, got {tuple(buf.shape)}")
        if not buf.is_contiguous():
            raise ValueError(f"{name} must be contiguous (backward adds into it in place), got strides "
                             f"{buf.stride()}")
    if active is not None:
        _check_active(active, gate, kind, R)
    return kind


def _check_active(active, gate, kind: str, R: int) -> None:
    """``active`` must be exactly the non-zero ranks of a fixed per-rank gate (one host read)."""
    if not isinstance(active, torch.Tensor):
        raise TypeError(f"active must be an int64 tensor of rank indices, got {type(active).__name__}")
    if active.dtype != torch.int64 or active.dim() != 1:
        raise TypeError(f"active must be a 1-D int64 tensor, got {active.dtype} shape {tuple(active.shape)}")
    if kind != "rank" or gate.requires_grad:
        raise ValueError("active (compacted ranks) needs a fixed per-rank gate [R] that does not require grad; "
                         f"got gate {'None' if gate is None else tuple(gate.shape)}")
    expected = torch.nonzero(gate, as_tuple=False).flatten()
    if active.numel() and (int(active.min()) < 0 or int(active.max()) >= R):
        raise ValueError(f"active holds rank indices outside [0, R={R}): {active.tolist()}")
    if not torch.equal(active.to(expected.device), expected):
        raise ValueError(f"active {active.tolist()} contradicts the gate, whose non-zero ranks are "
                         f"{expected.tolist()}: pass active=None to derive it from the gate")


class GradSlot:
    """An in-place accumulation target bound when backward runs: the parameter's ``.grad``, created as zeros if it
    is None at that moment (ShareLoRA's shared matrices).

    A buffer captured at forward time goes stale when the training loop calls ``zero_grad(set_to_none=True)``
    between the forward and ``loss.backward()``: backward would add into an orphan tensor and the parameter would
    get no gradient at all. The slot is resolved by every backward that adds into it (each layer's, in autograd's
    order), so all contributions of one backward land in the ``.grad`` that exists then. ``on_bind`` is called
    with the parameter and its buffer each time (the layer records the buffer it owns).
    """

    __slots__ = ("param", "on_bind")

    def __init__(self, param: Tensor, on_bind=None):
        self.param, self.on_bind = param, on_bind

    def resolve(self) -> Tensor:
        p = self.param
        if p.grad is None:
            p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
        g = p.grad
        if g.dtype not in (torch.float32, torch.float64) or not g.is_contiguous() or g.shape != p.shape:
            raise RuntimeError(f"the .grad of a shared LoRA matrix {tuple(p.shape)} was replaced by a tensor that "
                               f"cannot be accumulated into in place (dtype {g.dtype}, shape {tuple(g.shape)}, "
                               f"contiguous={g.is_contiguous()}); set it to None or zero it instead")
        if self.on_bind is not None:
            self.on_bind(p, g)
        return g


def _slot_wanted(buf) -> bool:
    """False when ``buf`` is a :class:`GradSlot` whose parameter's gradient the running backward leaves out:
    ``torch.autograd.grad(loss, x)`` or ``loss.backward(inputs=[...])`` without that parameter must not write into
    its ``.grad`` (an in-place accumulation is a side effect autograd cannot discard the way it drops an unneeded
    returned gradient). Anything else (a plain buffer, or a call outside a backward) is wanted. Not covered:
    ``autograd.grad(loss, A)`` on the shared matrix itself (in-place mode gives autograd no path to it; use
    ``accumulate="autograd"``), and the torch.compile route, whose slot is bound at forward time."""
    if not isinstance(buf, GradSlot):
        return True
    try:
        node = torch.autograd.graph.get_gradient_edge(buf.param).node
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:   # not inside a backward pass, or a parameter that no longer requires grad
        return True


def _bind(buf):
    """A backward-time accumulation target: a :class:`GradSlot` resolves to its parameter's ``.grad`` now."""
    return buf.resolve() if isinstance(buf, GradSlot) else buf


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
    _, impl = select_backend(x, g, dropout_p)
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
        _, impl = select_backend(x, g, dropout_p)
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
        need_a, need_b = need_a and _slot_wanted(accum_a), need_b and _slot_wanted(accum_b)
        dx, da, db, dg = _backward_impl(dy, x, weight, lora_a, lora_b, h, gate, ctx.scale, ctx.dropout_p, seed,
                                        active, (need_x, need_a, need_b, need_g),
                                        _bind(accum_a) if need_a else None, _bind(accum_b) if need_b else None)
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
    # The custom op takes tensors only: a GradSlot is bound now (the buffer that exists at forward time).
    return torch.ops.lora_kernels.gated_lora_forward(x, weight, bias, lora_a, lora_b, gate, scale, dropout_p, seed,
                                                     active, _bind(accum_a), _bind(accum_b))[0]


# ---- the public op -------------------------------------------------------------------------------------------
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


def compacted_ranks(gate: Optional[Tensor], kind: str) -> Optional[Tensor]:
    """The one compaction decision: a fixed per-rank gate (no gradient) runs on its active ranks. Never under
    torch.compile (a data-dependent shape): there the 0/1 gate zeroes the masked ranks' terms instead (same values
    and gradients, full-rank cost). A gate that needs a gradient is never compacted (docs/ALGORITHMS.md §1)."""
    return active_ranks(gate) if _may_compact(gate, kind) else None


def _may_compact(gate: Optional[Tensor], kind: str) -> bool:
    return kind == "rank" and not gate.requires_grad and not torch.compiler.is_compiling()


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    gate: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    active: Optional[Tensor] = None,
    seed: Optional[int] = None,
    accum_a: Optional[Tensor] = None,
    accum_b: Optional[Tensor] = None,
) -> Tensor:
    """Gated LoRA linear ``y = x Wᵀ + b + s·((dropout(x) Aᵀ) ⊙ G) Bᵀ``; W and b are treated as frozen.

    Args:
        x: [..., K] input.
        weight: [N, K] frozen base weight (same dtype as x).
        bias: [N] or None.
        lora_a: [R, K] down projection.  lora_b: [N, R] up projection.
        scale: s (usually alpha / r), finite.
        gate: None, per-rank [R] (0/1 mask or singular values) or per-token [T, R], T = x.numel() // K.
        dropout_p: dropout on the LoRA input in [0, 1), applied only when ``training``; regenerated from a seed.
        active: optional ``active_ranks(gate)`` for a fixed per-rank gate; checked against the gate (one host
            read). Derived from the gate when None.
        seed: dropout seed in [0, 2**63); drawn from torch's generator when None.
        accum_a, accum_b: optional fp32 buffers shaped like lora_a / lora_b (ShareLoRA): backward adds this
            call's dA / dB into them in place and returns no gradient for lora_a / lora_b through autograd.
    Returns:
        [..., N] in x's dtype. Differentiable w.r.t. x, lora_a, lora_b and gate.
    """
    return _lora_linear(x, weight, bias, lora_a, lora_b, scale, gate, dropout_p, training, active, seed,
                        accum_a, accum_b, check_active=True)


def check_base_frozen(weight, bias) -> None:
    """The op (and every path that reuses its pieces) treats the base layer as frozen: a base weight or bias that
    requires grad would silently get none, so it is refused while grad mode is on."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad, but the gated LoRA op treats the base layer as frozen and "
                             f"never computes its gradient: call {name}.requires_grad_(False) (LoRALinear does)")


def _lora_linear(x, weight, bias, lora_a, lora_b, scale, gate, dropout_p, training, active, seed, accum_a, accum_b,
                 check_active: bool) -> Tensor:
    """:func:`lora_linear`; adapter layers pass ``check_active=False`` with an ``active`` they derived from their
    own validated rank mask (cached per mask version, so no host read per call)."""
    check_tensor("x", x)
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        # Run the op in the autocast dtype, then with autocast off so the backends see one dtype. As autocast
        # itself does (nn.Linear included), float64 tensors are left alone: only float32 / half ones are cast.
        dt = torch.get_autocast_dtype(x.device.type)

        def cast(t):
            return t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        if isinstance(weight, Tensor) and (bias is None or isinstance(bias, Tensor)):
            x, weight, bias = cast(x), cast(weight), cast(bias)
        with torch.autocast(x.device.type, enabled=False):
            return _lora_linear(x, weight, bias, lora_a, lora_b, scale, gate, dropout_p, training, active, seed,
                                accum_a, accum_b, check_active)
    kind = check_gated_lora_args(x, weight, bias, lora_a, lora_b, gate, dropout_p, scale, seed=seed,
                                 active=active if check_active else None, accum_a=accum_a, accum_b=accum_b)
    check_base_frozen(weight, bias)
    if torch.compiler.is_compiling() and (accum_a is not None or accum_b is not None):
        accum_a, accum_b = _compile_accum(lora_a, lora_b, _bind(accum_a), _bind(accum_b))
    K, N = weight.shape[1], weight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), K)     # [T, K]; explicit T: reshape(-1, 0) is ambiguous, and a fresh empty
    # tensor for K = 0 would cut x out of the graph (x.grad None where nn.Linear gives an empty gradient)
    p = float(dropout_p) if training else 0.0
    seed_t = None
    if p > 0:
        # A tensor, drawn exactly as new_dropout_seed draws it: under torch.compile a fresh seed per step then
        # neither breaks the graph (.item()) nor recompiles it (a new int constant).
        seed_t = torch.randint(0, 2**31 - 1, (1,)) if seed is None else torch.tensor([int(seed)], dtype=torch.int64)
    if not _may_compact(gate, kind):
        active = None
    elif active is None:
        active = active_ranks(gate)
    y = gated_lora(x2, weight, bias, lora_a, lora_b, gate, float(scale), p, seed_t, active, accum_a, accum_b)
    return y.reshape(*lead, N)
