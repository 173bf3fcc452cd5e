"""CUDA backend of the gated LoRA op for decode-like shapes (T ≤ 64), see :mod:`lora_kernels.gated`.

The skinny products run in the custom kernels of csrc/gated_lora.cu (Punica BGMV-style: one warp per
(token, rank) dot product, fp32 accumulation); the dense GEMMs (x Wᵀ + b, dy W, dA, dB) go to cuBLAS
through torch. Semantics are those of :func:`lora_kernels.reference.gated_lora_forward` / ``_backward``;
``h`` comes back in fp32 (the kernels accumulate in fp32 and the saved H is only [T, R]).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _alloc, _cuda_loader, reference
from .checks import check_gated_lora_args
from .dispatch import Problem

MAX_TOKENS = 64  # beyond this a tiled GEMM (Triton backend) beats one warp per dot product
KERNEL_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # = module DTYPE_F32/F16/BF16
_M32 = 0xFFFFFFFF


def supports(p: Problem) -> tuple[bool, str]:
    if p.op != "gated_lora":
        return False, f"cuda_gated implements op 'gated_lora', not {p.op!r}"
    if p.device.type != "cuda":
        return False, f"the CUDA backend needs CUDA tensors, got device {p.device}"
    if p.dtype not in KERNEL_DTYPES:
        return False, f"dtype {p.dtype} is not supported by the CUDA kernels (fp32, fp16, bf16)"
    if p.tokens > MAX_TOKENS:
        return False, (f"T={p.tokens} tokens > {MAX_TOKENS}: the CUDA kernels are the skinny decode path; "
                       "the Triton backend handles prefill/training shapes")
    return True, f"skinny CUDA kernels (T={p.tokens} <= {MAX_TOKENS})"


def check_cuda_tensor(name: str, t: torch.Tensor | None, device: torch.device | None = None) -> None:
    """Raises naming ``name`` unless ``t`` (when given) is a CUDA tensor of a kernel dtype on ``device``."""
    if t is None:
        return
    if t.device.type != "cuda":
        raise ValueError(f"{name} is on {t.device}: the CUDA backend needs CUDA tensors")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}: all tensors must share one device")
    if t.dtype not in KERNEL_DTYPES and t.dtype != torch.float64:
        raise TypeError(f"{name} has dtype {t.dtype}; the CUDA backend takes fp32, fp16 or bf16")


def check_forward_args(x, weight, bias, lora_a, lora_b, scale, gate, dropout_p, seed) -> None:
    """Validation of :func:`gated_lora_forward`'s arguments (shapes via :mod:`lora_kernels.checks`)."""
    _check_forward_shapes(x, weight, bias, lora_a, lora_b, scale, gate, dropout_p, seed)
    _check_devices(x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, gate=gate)


def _check_forward_shapes(x, weight, bias, lora_a, lora_b, scale, gate, dropout_p, seed) -> None:
    check_gated_lora_args(x, weight, bias, lora_a, lora_b, gate, dropout_p, scale)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, K] for a backend, got shape {tuple(x.shape)}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; the CUDA kernels take fp32, fp16 or bf16")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be a Python int, got {type(seed).__name__}")


def _check_devices(x, **others) -> None:
    check_cuda_tensor("x", x)
    for name, t in others.items():
        check_cuda_tensor(name, t, x.device)


def check_backward_args(dy, x, weight, lora_a, lora_b, h, scale, gate, dropout_p, seed, needs, accum_a,
                        accum_b) -> None:
    """Validation of :func:`gated_lora_backward`'s arguments: shapes and dtypes first, then devices."""
    _check_forward_shapes(x, weight, None, lora_a, lora_b, scale, gate, dropout_p, seed)
    T, N, R, K = x.shape[0], weight.shape[0], lora_a.shape[0], x.shape[1]
    if not isinstance(dy, torch.Tensor) or tuple(dy.shape) != (T, N):
        raise ValueError(f"dy must be a [T, N] = [{T}, {N}] tensor, got "
                         f"{tuple(dy.shape) if isinstance(dy, torch.Tensor) else type(dy).__name__}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy has dtype {dy.dtype} but x has {x.dtype}")
    if not isinstance(h, torch.Tensor) or tuple(h.shape) != (T, R):
        raise ValueError(f"h must be the [T, R] = [{T}, {R}] tensor saved by forward, got "
                         f"{tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}")
    if len(needs) != 4:
        raise ValueError(f"needs must be 4 booleans (dx, dA, dB, dG), got {needs!r}")
    for name, buf, shape in (("accum_a", accum_a, (R, K)), ("accum_b", accum_b, (N, R))):
        if buf is not None and (tuple(buf.shape) != shape or buf.dtype != torch.float32):
            raise ValueError(f"{name} must be an fp32 buffer of shape {list(shape)}, got "
                             f"{buf.dtype} {tuple(buf.shape)}")
    _check_devices(x, dy=dy, weight=weight, lora_a=lora_a, lora_b=lora_b, h=h, gate=gate, accum_a=accum_a,
                   accum_b=accum_b)


def _kernel_operand(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in KERNEL_DTYPES else t.float()


def _dropout_args(dropout_p: float, seed: int) -> dict:
    threshold = reference.dropout_threshold(dropout_p) if dropout_p > 0 else 0
    scale = 1.0 / (1.0 - dropout_p) if threshold else 1.0
    return {"seed": int(seed) & _M32, "dropout_threshold": threshold, "dropout_scale": scale}


def _shrink(mod, inp, m, m_strides, out, hg, gate, alpha, dropout, stream):
    """out [T, R] = alpha · dropout(inp) [T, D] · M [R, D]ᵀ, with M read through ``m_strides``."""
    gate_kind, gs = 0, (0, 0)
    if gate is not None:
        gate_kind, gs = (1, (0, gate.stride(0))) if gate.dim() == 1 else (2, tuple(gate.stride()))
    mod.shrink(in_ptr=inp.data_ptr(), in_dtype=KERNEL_DTYPES[inp.dtype], in_s0=inp.stride(0), in_s1=inp.stride(1),
               m_ptr=m.data_ptr(), m_dtype=KERNEL_DTYPES[m.dtype], m_s0=m_strides[0], m_s1=m_strides[1],
               out_ptr=out.data_ptr(), out_s0=out.stride(0),
               hg_ptr=hg.data_ptr() if hg is not None else 0, hg_s0=hg.stride(0) if hg is not None else 0,
               gate_ptr=gate.data_ptr() if gate is not None else 0, gate_kind=gate_kind, gate_s0=gs[0],
               gate_s1=gs[1], T=out.shape[0], D=inp.shape[1], R=out.shape[1], alpha=float(alpha), stream=stream,
               **dropout)


def _expand_add(mod, y, h, m, m_strides, alpha, dropout, stream):
    """y [T, N] += alpha · mask ⊙ (h [T, R] · M [N, R]ᵀ), with M read through ``m_strides``."""
    mod.expand_add(y_ptr=y.data_ptr(), y_dtype=KERNEL_DTYPES[y.dtype], y_s0=y.stride(0), y_s1=y.stride(1),
                   h_ptr=h.data_ptr(), h_s0=h.stride(0), h_s1=h.stride(1),
                   m_ptr=m.data_ptr(), m_dtype=KERNEL_DTYPES[m.dtype], m_s0=m_strides[0], m_s1=m_strides[1],
                   T=y.shape[0], N=y.shape[1], R=h.shape[1], alpha=float(alpha), stream=stream, **dropout)


_NO_DROPOUT = {"seed": 0, "dropout_threshold": 0, "dropout_scale": 1.0}


def gated_lora_forward(
    x: torch.Tensor,            # [T, K]
    weight: torch.Tensor,       # [N, K]
    bias: torch.Tensor | None,  # [N]
    lora_a: torch.Tensor,       # [R, K]
    lora_b: torch.Tensor,       # [N, R]
    scale: float,
    gate: torch.Tensor | None = None,  # None | [R] | [T, R]
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(y [T, N] in x.dtype, h [T, R] fp32)`` with ``h = dropout(x) Aᵀ`` (ungated)."""
    check_forward_args(x, weight, bias, lora_a, lora_b, scale, gate, dropout_p, seed)
    T, R = x.shape[0], lora_a.shape[0]
    with torch.cuda.device(x.device):
        y = F.linear(x, weight, bias)                                           # [T, N] cuBLAS
        h = _alloc.empty(T, R, dtype=torch.float32, device=x.device)            # [T, R]
        if T == 0 or R == 0:
            return y, h.zero_()
        mod = _cuda_loader.require()
        stream = torch.cuda.current_stream(x.device).cuda_stream
        a, b = _kernel_operand(lora_a), _kernel_operand(lora_b)
        g = gate.float() if gate is not None else None
        hg = _alloc.empty(T, R, dtype=torch.float32, device=x.device) if g is not None else None
        _shrink(mod, x, a, a.stride(), h, hg, g, 1.0, _dropout_args(dropout_p, seed), stream)
        _expand_add(mod, y, hg if hg is not None else h, b, b.stride(), scale, _NO_DROPOUT, stream)
    return y, h


def gated_lora_backward(
    dy: torch.Tensor,           # [T, N]
    x: torch.Tensor,            # [T, K]
    weight: torch.Tensor,       # [N, K]
    lora_a: torch.Tensor,       # [R, K]
    lora_b: torch.Tensor,       # [N, R]
    h: torch.Tensor,            # [T, R]
    scale: float,
    gate: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
    accum_a: torch.Tensor | None = None,   # fp32 [R, K], dA added in place
    accum_b: torch.Tensor | None = None,   # fp32 [N, R], dB added in place
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dx [T,K], dA [R,K], dB [N,R], dG [R] or [T,R])`` as in the reference; entries of ``needs``
    that are False, and dA / dB accumulated into ``accum_a`` / ``accum_b``, come back as None."""
    check_backward_args(dy, x, weight, lora_a, lora_b, h, scale, gate, dropout_p, seed, needs, accum_a, accum_b)
    need_x, need_a, need_b, need_g = needs
    need_g = need_g and gate is not None
    T, K, R = x.shape[0], x.shape[1], lora_a.shape[0]
    dx = da = db = dg = None
    with torch.cuda.device(x.device):
        mod = _cuda_loader.require() if T > 0 and R > 0 else None
        stream = torch.cuda.current_stream(x.device).cuda_stream
        a, b = _kernel_operand(lora_a), _kernel_operand(lora_b)
        g = gate.float() if gate is not None else None
        hf = h.float()                                                          # [T, R]
        dz = dh = None
        if need_x or need_a or need_g:
            new = _alloc.empty if mod is not None else torch.zeros  # the kernel writes every element
            dz = new(T, R, dtype=torch.float32, device=x.device)               # [T, R] dZ = s·(dy B)
            dh = new(T, R, dtype=torch.float32, device=x.device) if g is not None else dz  # dH = dZ ⊙ G
            if mod is not None:
                # Bᵀ as the [R, N] operand: M[r, n] = B[n, r].
                _shrink(mod, dy, b, (b.stride(1), b.stride(0)), dz, dh if g is not None else None, g, scale,
                        _NO_DROPOUT, stream)
        if need_x:
            dx = dy @ weight                                                    # [T, K] cuBLAS
            if mod is not None:
                # Aᵀ as the [K, R] operand: M[k, r] = A[r, k]; the dropout mask applies on (t, k).
                _expand_add(mod, dx, dh, a, (a.stride(1), a.stride(0)), 1.0, _dropout_args(dropout_p, seed), stream)
        if need_a:
            xd = x.float()                                                      # [T, K]
            if dropout_p > 0:
                xd = xd * reference.dropout_mask(seed, T, K, dropout_p, x.device, torch.float32)
            if accum_a is not None:
                accum_a.addmm_(dh.t(), xd)
            else:
                da = (dh.t() @ xd).to(lora_a.dtype)                             # [R, K]
        if need_b:
            hg = hf * g if g is not None else hf                                # [T, R]
            if accum_b is not None:
                accum_b.addmm_(dy.float().t(), hg, alpha=scale)
            else:
                db = (dy.float().t() @ hg).mul_(scale).to(lora_b.dtype)         # [N, R]
        if need_g:
            dg = dz * hf                                                        # [T, R]
            if gate.dim() == 1:
                dg = dg.sum(0)
            dg = dg.to(gate.dtype)
    return dx, da, db, dg
