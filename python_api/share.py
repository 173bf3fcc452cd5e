"""ShareLoRA (ALGORITHMS.md §4): adapter layers that share A and/or B by reference, with in-place gradients.

Grouping. A *module type* is a module name with its layer indices replaced by ``*``
(``encoder.layer.*.attention.self.query``): scope ``"module_type"`` shares one matrix per type;
scope ``"attention"`` also merges q, k and v of a block into one type (``...attention.self.<qkv>``), so one
A serves q, k, v of every layer. Other targets (o_proj, MLP) keep the per-type scope.

Gradients of a shared matrix (``accumulate="inplace"``, the default). Each layer's contribution is added
in place into the parameter's ``.grad`` (one buffer in the parameter's dtype, fp32 for master weights): the
layer hands the op a :class:`~lora_kernels.gated_lora.op.GradSlot` as ``accum_a`` / ``accum_b``, which each
backward resolves to the ``.grad`` that exists *then* (created as zeros when None) and ``addmm_``s into, so
autograd never materialises a per-layer dA nor sums L of them. Binding at backward time, not at forward time,
is what makes every ordinary loop right (tests/python_api/test_share_loops.py): ``zero_grad`` before the forward,
between forward and backward or after the step, ``set_to_none`` either way, micro-batch accumulation, autocast,
activation checkpointing (reentrant or not), DDP with ``no_sync``. Under torch.compile or with tensor subclasses
(the custom-op route) the slot is bound at forward time instead. Consequences, all tested:
- micro-batch accumulation works (the buffer simply keeps growing), and ``zero_grad(set_to_none=True)``
  too, wherever the loop calls it (the next backward makes a new buffer);
- a backward that leaves the shared matrix out (``torch.autograd.grad(loss, x)``, ``backward(inputs=[...])``)
  adds nothing into its ``.grad``: each backward asks autograd's engine whether the matrix is wanted;
- the matrix must receive its gradient through the adapter op only: ``torch.autograd.grad(loss, A)`` sees
  no path to A, and a second use of A elsewhere in the graph (a regulariser) is refused by a hook at
  backward time. Use ``accumulate="autograd"`` for either (per-layer temporaries summed by autograd);
- half-precision shared matrices (a model cast wholesale with ``.to(bf16)``) fall back to autograd, since the
  buffer must be fp32 (or fp64 on the torch path) to accumulate L contributions without bf16 rounding.
Determinism: the contributions are added in autograd's backward order, which is fixed for a given graph,
and the torch backend's ``addmm_`` is deterministic, so CPU results are bit-identical run to run. On GPU the
ordering between layers is still fixed (one backward stream); bit-exactness within one layer's dA then
depends on the backend's reduction over tokens (``LORA_KERNELS_BACKEND=torch`` is the deterministic mode).

Shrink once. When one A is shared by projections that read the same input tensor (q, k, v under the
attention scope), the first projection computes ``H = x Aᵀ`` and its siblings reuse it (cache keyed on the
input tensor's identity and version counter, the A version and grad mode; one entry per group). The reuse
runs the split shrink/expand torch ops of :mod:`lora_kernels.shared` instead of the fused gated op, and only
without dropout, gates or autocast (one dropout mask or gate per projection would change H).
"""
from __future__ import annotations

import re
import weakref

import torch
from torch import nn

from lora_kernels.gated_lora import split as shared_ops

from lora_kernels.gated_lora import op as gated_op
from .config import ACCUMULATE, ATTENTION_NAMES
from .layers import LoRALinear

SHARE_MODES = {None: (), "A": ("lora_A",), "B": ("lora_B",), "AB": ("lora_A", "lora_B")}  # mode -> shared matrices
_INPLACE_DTYPES = (torch.float32, torch.float64)
_INDEX = re.compile(r"^\d+$")


def module_type(name: str) -> str:
    """``encoder.layer.3.attention.self.query`` -> ``encoder.layer.*.attention.self.query``."""
    return ".".join("*" if _INDEX.match(p) else p for p in name.split("."))


def group_key(name: str, scope: str, attention_names=ATTENTION_NAMES) -> str:
    """The sharing group of a module under ``scope`` (see the module docstring)."""
    parts = module_type(name).split(".")
    if scope == "attention" and parts[-1] in attention_names:
        parts[-1] = "<qkv>"
    return ".".join(parts)


class ShareGroup:
    """The modules sharing one matrix (``param`` is ``"lora_A"`` or ``"lora_B"``) and the shrink cache."""

    def __init__(self, key: str, param: str, multi_type: bool):
        self.key, self.param, self.multi_type = key, param, multi_type
        self.modules: list[str] = []
        self.hits = 0   # shrinks saved by reuse (tests and benchmarks read it)
        self._cache = None

    def clear_cache(self) -> None:
        self._cache = None

    def shrink(self, module: nn.Module, x: torch.Tensor, x2: torch.Tensor, a: torch.Tensor,
               accum: torch.Tensor | None) -> torch.Tensor:
        """``H = x2 Aᵀ`` [T, R], reused when a sibling already computed it on the same ``x``."""
        key = (x._version, a._version, torch.is_grad_enabled())
        c = self._cache
        # A module seeing the same x twice (activation checkpointing recomputes the forward) must not
        # pick up its own H from the first pass: each entry serves each module once.
        if c is not None and c[0]() is x and c[1] == key and id(module) not in c[3]:
            c[3].add(id(module))
            self.hits += 1
            return c[2]
        h = _ShrinkFn.apply(x2, a, accum)
        self._cache = (weakref.ref(x), key, h, {id(module)})
        return h

    def __deepcopy__(self, memo):
        new = ShareGroup(self.key, self.param, self.multi_type)
        new.modules = list(self.modules)
        return new

    def __getstate__(self):
        # the shrink cache holds a weakref to one forward's input: per-forward state, and not picklable
        return {**self.__dict__, "_cache": None}


class _GradRef(weakref.ref):
    """Weak reference to a shared matrix's accumulation buffer (its ``.grad``). A pickled model carries no
    ``.grad``, so it pickles as no reference; plain weakrefs cannot be pickled at all."""

    __slots__ = ()

    def __reduce__(self):
        return _no_ref, ()


def _no_ref() -> None:
    return None


class _ShrinkFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, accum):
        ctx.save_for_backward(x, a)
        ctx.accum = accum
        return shared_ops.shrink_forward(x, a)

    @staticmethod
    def backward(ctx, dh):
        x, a = ctx.saved_tensors
        need_a = ctx.needs_input_grad[1] and gated_op._slot_wanted(ctx.accum)
        accum = gated_op._bind(ctx.accum) if need_a else None
        dx, da = shared_ops.shrink_backward(dh, x, a, ctx.needs_input_grad[0], need_a, accum)
        return dx, da, None


class _ExpandFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, h, b, scale, accum):
        ctx.save_for_backward(weight, h, b)
        ctx.scale, ctx.accum = scale, accum
        return shared_ops.expand_forward(x, weight, bias, h, b, scale)

    @staticmethod
    def backward(ctx, dy):
        weight, h, b = ctx.saved_tensors
        nx, _, _, nh, nb = ctx.needs_input_grad[:5]
        nb = nb and gated_op._slot_wanted(ctx.accum)
        accum = gated_op._bind(ctx.accum) if nb else None
        dx, dh, db = shared_ops.expand_backward(dy.contiguous(), weight, h, b, ctx.scale, nx, nh, nb, accum)
        return dx, None, None, dh, db, None, None


def _refuse_autograd_grad(p: torch.Tensor) -> None:
    # The hook also fires when the op returned no gradient (in-place mode): only a .grad that is no longer
    # the buffer the layers accumulate into means autograd replaced it. No buffer handed out (a fresh copy of
    # the model, switched to accumulate="autograd") means no in-place contribution to lose.
    buf = getattr(p, "_lora_kernels_buffer", None)
    if p.grad is None or p.dtype not in _INPLACE_DTYPES or buf is None or buf() is p.grad:
        return
    raise RuntimeError(
        f"a shared LoRA matrix {tuple(p.shape)} received a gradient through autograd while its layers accumulate "
        "in place (another use of it in the graph, e.g. a regulariser): that gradient would replace the shared "
        "buffer. Apply adapters with accumulate='autograd' for this use.")


def _record_buffer(p: torch.Tensor, grad: torch.Tensor) -> None:
    # The buffer the layers add into: _refuse_autograd_grad tells it apart from a gradient autograd wrote.
    buf = getattr(p, "_lora_kernels_buffer", None)
    if buf is None or buf() is not grad:
        p._lora_kernels_buffer = _GradRef(grad)


class SharedLoRALinear(LoRALinear):
    """A :class:`LoRALinear` whose ``lora_A`` and/or ``lora_B`` is one Parameter shared with other layers.

    Built by :func:`python_api.apply_adapters` (``share="A"|"B"|"AB"``); ``share_a`` / ``share_b`` name the
    :class:`ShareGroup` of each shared matrix (None when the matrix is this layer's own).
    """

    share_a: ShareGroup | None = None
    share_b: ShareGroup | None = None
    accumulate: str = "inplace"
    reuse_shrink: bool = True

    def configure_sharing(self, share_a: ShareGroup | None, share_b: ShareGroup | None,
                          accumulate: str = "inplace", reuse_shrink: bool = True) -> None:
        if accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate must be one of {ACCUMULATE}, got {accumulate!r}")
        self.share_a, self.share_b = share_a, share_b
        self.accumulate, self.reuse_shrink = accumulate, bool(reuse_shrink)
        self._guard_shared()

    def _guard_shared(self) -> None:
        if self.accumulate == "inplace":
            for grp, p in ((self.share_a, self.lora_A), (self.share_b, self.lora_B)):
                hooks = getattr(p, "_post_accumulate_grad_hooks", None) or {}
                if grp is not None and _refuse_autograd_grad not in hooks.values():
                    p.register_post_accumulate_grad_hook(_refuse_autograd_grad)

    def __setstate__(self, state):
        super().__setstate__(state)
        # torch drops tensor hooks on pickle and deepcopy: put the guard back on the (still shared) matrices
        self._guard_shared()

    def _accum_buffer(self, grp: ShareGroup | None, p: torch.Tensor) -> gated_op.GradSlot | None:
        # A slot, not p.grad itself: the buffer is bound when backward runs, so zero_grad(set_to_none=True)
        # between this forward and loss.backward() cannot orphan it (issue #14).
        if grp is None or self.accumulate != "inplace" or p.dtype not in _INPLACE_DTYPES:
            return None
        if not (torch.is_grad_enabled() and p.requires_grad):
            return None
        return gated_op.GradSlot(p, _record_buffer)

    def _reuse_ok(self, x: torch.Tensor, gate) -> bool:
        grp = self.share_a
        return (self.reuse_shrink and grp is not None and grp.multi_type and gate is None
                and self._token_gate is None and not (self.training and self.dropout > 0)
                and not x.is_inference() and not torch.is_autocast_enabled(x.device.type)
                and x.dtype == self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        acc_a = self._accum_buffer(self.share_a, self.lora_A)
        acc_b = self._accum_buffer(self.share_b, self.lora_B)
        gate, active = self.op_gate()
        if self._reuse_ok(x, gate) and x.numel():
            if x.dim() < 1 or x.shape[-1] != self.in_features:   # the op's own check, before the reshape below
                raise ValueError(f"x must have shape [..., {self.in_features}] (weight expects K="
                                 f"{self.in_features}), got shape {tuple(x.shape)}")
            gated_op.check_base_frozen(self.weight, self.bias)
            x2 = x.reshape(-1, self.in_features)                                   # [T, K]
            h = self.share_a.shrink(self, x, x2, self.lora_A, acc_a)               # [T, R]
            y = _ExpandFn.apply(x2, self.weight, self.bias, h, self.lora_B, self.scaling, acc_b)
            return y.reshape(*x.shape[:-1], self.out_features)
        return gated_op._lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, gate,
                                     self.dropout, self.training, active, None, acc_a, acc_b, check_active=False)

    def extra_repr(self) -> str:
        shared = [g.param for g in (self.share_a, self.share_b) if g is not None]
        return super().extra_repr() + f", shared={'+'.join(shared) or 'none'}, accumulate={self.accumulate}"
