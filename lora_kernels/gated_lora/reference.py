"""Readable pure-torch versions of every op: the oracle for tests and the CPU path.

Shape legend (ALGORITHMS.md §1):
    T  tokens (batch × sequence, flattened)     K  input features
    N  output features                          R  LoRA rank (all experts' ranks stacked for MoE)

The gated LoRA linear:
    H = dropout(x) Aᵀ                     # [T, R]  "shrink"
    y = x Wᵀ + b + s · (H ⊙ G) Bᵀ         # [T, N]  "expand"
with the gate G absent, per-rank [R] or per-token [T, R].

Dropout is *regenerated from a seed*, never stored: the keep decision of element (t, k) is a pure
function of (seed, t, k) (a murmur3-finaliser hash, see :func:`dropout_keep`). The Triton and CUDA
kernels evaluate the same hash, so all backends drop exactly the same elements and can be compared
bit-for-bit on the mask.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
# Golden-ratio and murmur3 constants; any odd 32-bit constants would do.
_ROW_MUL = 0x9E3779B9
_COL_MUL = 0x85EBCA6B
_FMIX_1 = 0x85EBCA6B
_FMIX_2 = 0xC2B2AE35
KEEP_BITS = 24  # the keep test compares the top 24 bits of the hash with p · 2^24


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3 32-bit finaliser on int64 tensors holding uint32 values (wraps like uint32)."""
    h = h ^ (h >> 16)
    h = (h * _FMIX_1) & _M32
    h = h ^ (h >> 13)
    h = (h * _FMIX_2) & _M32
    h = h ^ (h >> 16)
    return h


def dropout_threshold(p: float) -> int:
    """Integer threshold: an element is dropped when ``hash >> 8 < threshold``."""
    return int(round(p * (1 << KEEP_BITS)))


def dropout_keep(seed: int, rows: torch.Tensor, cols: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean keep mask for the (row, col) grid given by broadcasting ``rows`` [T,1] and ``cols`` [1,K]."""
    s = torch.tensor(seed & _M32, dtype=torch.int64, device=rows.device)
    r = _fmix32((s + rows.to(torch.int64) * _ROW_MUL) & _M32)
    h = _fmix32((r ^ ((cols.to(torch.int64) * _COL_MUL) & _M32)) & _M32)
    return (h >> (32 - KEEP_BITS)) >= dropout_threshold(p)


def dropout_mask(seed: int, T: int, K: int, p: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Scaled inverted-dropout mask [T, K]: 0 where dropped, 1/(1-p) where kept."""
    rows = torch.arange(T, device=device).unsqueeze(1)
    cols = torch.arange(K, device=device).unsqueeze(0)
    keep = dropout_keep(seed, rows, cols, p)
    return keep.to(dtype) * (1.0 / (1.0 - p))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Compute in the activation dtype: torch's half GEMMs accumulate in fp32 internally on CPU (oneDNN,
    # AMX-bf16) and GPU (cuBLAS), and upcasting would throw away the bf16 speed-up. Adapters kept as
    # fp32 master weights are cast down for the product, as autocast would.
    return dtype


def _apply_gate(h: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return h if gate is None else h * gate.to(h.dtype)


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
    """Returns ``(y [T, N] in x.dtype, h [T, R])``; ``h = dropout(x) Aᵀ`` (ungated) is what backward needs."""
    cd = _compute_dtype(x.dtype)
    xc = x.to(cd)
    xd = xc * dropout_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device, cd) if dropout_p > 0 else xc
    h = xd @ lora_a.to(cd).t()                                            # [T, R]
    b = bias.to(cd) if bias is not None else None
    y = torch.addmm(b, xc, weight.to(cd).t()) if b is not None else xc @ weight.to(cd).t()
    y = y.addmm_(_apply_gate(h, gate), lora_b.to(cd).t(), alpha=scale)   # [T, N]
    return y.to(x.dtype), h


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
    accum_a: torch.Tensor | None = None,   # fp32 [R, K]: dA is added here in place (shared A)
    accum_b: torch.Tensor | None = None,   # fp32 [N, R]: dB is added here in place (shared B)
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dx [T,K], dA [R,K], dB [N,R], dG [R] or [T,R])``; W is frozen so there is no dW.

    dZ = s·(dy B); dH = dZ ⊙ G; dx = dy W + mask ⊙ (dH A); dA = dHᵀ dropout(x);
    dB = s·dyᵀ (H ⊙ G); dG = dZ ⊙ H (summed over tokens for a per-rank gate).
    Entries of ``needs`` that are False come back as None. With ``accum_a`` / ``accum_b`` (fp32 buffers,
    ShareLoRA) the gradient is accumulated into the buffer in place, with no per-layer temporary
    of its size, and returned as None.
    """
    need_x, need_a, need_b, need_g = needs
    cd = _compute_dtype(dy.dtype)
    dyc = dy.to(cd)
    hc = h.to(cd)
    mask = None
    if dropout_p > 0 and (need_x or need_a):
        mask = dropout_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device, cd)
    dz = (dyc @ lora_b.to(cd)) * scale if (need_x or need_a or need_g) else None   # [T, R]
    dh = _apply_gate(dz, gate) if dz is not None else None                        # [T, R]
    dx = da = db = dg = None
    if need_x:
        lora_dx = dh @ lora_a.to(cd)                                             # [T, K]
        if mask is not None:
            lora_dx = lora_dx * mask
        dx = torch.addmm(lora_dx, dyc, weight.to(cd)).to(dy.dtype)
    if need_a:
        xd = x.to(cd) * mask if mask is not None else x.to(cd)
        if accum_a is not None:
            accum_a.addmm_(dh.t().to(accum_a.dtype), xd.to(accum_a.dtype))
        else:
            da = (dh.t() @ xd).to(lora_a.dtype)                                  # [R, K]
    if need_b:
        hg = _apply_gate(hc, gate)
        if accum_b is not None:
            accum_b.addmm_(dyc.t().to(accum_b.dtype), hg.to(accum_b.dtype), alpha=scale)
        else:
            db = (dyc.t() @ hg).mul_(scale).to(lora_b.dtype)                      # [N, R]
    if need_g and gate is not None:
        dg = gate_grad(dz, hc, gate)
    return dx, da, db, dg


def gate_grad(dz: torch.Tensor, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """d loss / d gate from dz = d loss / d (h ⊙ gate) (scale applied): [T, R] for a token gate, summed over
    tokens for a rank gate [R]; in the gate's dtype. Shared by the torch and CPU backends."""
    dg = dz * h                                                                   # [T, R]
    if gate.dim() == 1:
        dg = dg.sum(0)
    return dg.to(gate.dtype)


def lora_linear_ref(x, weight, bias, lora_a, lora_b, scale, gate=None, dropout_p=0.0, seed=0):
    """Autograd-through-torch oracle on any leading shape: x [..., K] → [..., N]. Used by tests."""
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), x.shape[-1])   # explicit T: reshape(-1, 0) is ambiguous for K = 0
    xd = x2 * dropout_mask(seed, x2.shape[0], x2.shape[1], dropout_p, x.device, x.dtype) if dropout_p > 0 else x2
    h = xd @ lora_a.t()
    y = x2 @ weight.t()
    if bias is not None:
        y = y + bias
    y = y + scale * (_apply_gate(h, gate) @ lora_b.t())
    return y.reshape(*lead, weight.shape[0])
