"""CUDA backend of the gated LoRA op for decode-like shapes (T ≤ 64), see :mod:`.op`.

The skinny products run in the custom kernels of csrc/gated_lora.cu (Punica BGMV-style: one warp per
(token, rank) dot product, fp32 accumulation); the dense GEMMs (x Wᵀ + b, dy W, dA, dB) go to cuBLAS
through torch. Semantics are those of :func:`lora_kernels.reference.gated_lora_forward` / ``_backward``;
``h`` comes back in fp32 (the kernels accumulate in fp32 and the saved H is only [T, R]).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _alloc
from ..codes import DTYPE_CODES as KERNEL_DTYPES
from ..codes import GATE_NONE, GATE_RANK, GATE_TOKEN
from ..compiled import cuda_module
from ..dispatch import Problem
from . import reference

MAX_TOKENS = 64  # beyond this a tiled GEMM (Triton backend) beats one warp per dot product
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


def _kernel_operand(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in KERNEL_DTYPES else t.float()


def _dropout_args(dropout_p: float, seed: int) -> dict:
    threshold = reference.dropout_threshold(dropout_p) if dropout_p > 0 else 0
    scale = 1.0 / (1.0 - dropout_p) if threshold else 1.0
    return {"seed": int(seed) & _M32, "dropout_threshold": threshold, "dropout_scale": scale}


def _shrink(mod, inp, m, m_strides, out, hg, gate, alpha, dropout, stream):
    """out [T, R] = alpha · dropout(inp) [T, D] · M [R, D]ᵀ, with M read through ``m_strides``."""
    gate_kind, gs = GATE_NONE, (0, 0)
    if gate is not None:
        gate_kind, gs = (GATE_RANK, (0, gate.stride(0))) if gate.dim() == 1 else (GATE_TOKEN, tuple(gate.stride()))
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


def gated_lora_forward(x, weight, bias, lora_a, lora_b, scale, gate=None, dropout_p=0.0, seed=0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(y [T, N] in x.dtype, h [T, R] fp32)`` with ``h = dropout(x) Aᵀ`` (ungated)."""
    T, R = x.shape[0], lora_a.shape[0]
    with torch.cuda.device(x.device):
        y = F.linear(x, weight, bias)                                           # [T, N] cuBLAS
        h = _alloc.empty(T, R, dtype=torch.float32, device=x.device)            # [T, R]
        if T == 0 or R == 0:
            return y, h.zero_()
        mod = cuda_module.require()
        stream = torch.cuda.current_stream(x.device).cuda_stream
        a, b = _kernel_operand(lora_a), _kernel_operand(lora_b)
        g = gate.float() if gate is not None else None
        hg = _alloc.empty(T, R, dtype=torch.float32, device=x.device) if g is not None else None
        _shrink(mod, x, a, a.stride(), h, hg, g, 1.0, _dropout_args(dropout_p, seed), stream)
        _expand_add(mod, y, hg if hg is not None else h, b, b.stride(), scale, _NO_DROPOUT, stream)
    return y, h


def gated_lora_backward(dy, x, weight, lora_a, lora_b, h, scale, gate=None, dropout_p=0.0, seed=0,
                        needs=(True, True, True, True), accum_a=None, accum_b=None) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dx [T,K], dA [R,K], dB [N,R], dG [R] or [T,R])`` as in the reference; entries of ``needs``
    that are False, and dA / dB accumulated into ``accum_a`` / ``accum_b``, come back as None."""
    need_x, need_a, need_b, need_g = needs
    need_g = need_g and gate is not None
    T, K, R = x.shape[0], x.shape[1], lora_a.shape[0]
    dx = da = db = dg = None
    with torch.cuda.device(x.device):
        mod = cuda_module.require() if T > 0 and R > 0 else None
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
