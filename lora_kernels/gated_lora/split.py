"""ShareLoRA: the split shrink / expand ops used when several projections share one A and read the same x.

With one A shared by q, k and v of a block (ALGORITHMS.md §4, attention-wide scope) the three projections
see the same input, so the shrink ``H = x Aᵀ`` is computed once and each projection only runs its expand:

    H   = x Aᵀ                                  # [T, R]   once per block
    y_i = x W_iᵀ + b_i + s · H B_iᵀ             # [T, N_i] per projection

Backward: autograd sums the three ``dH_i = s · dy_i B_i`` into one [T, R] tensor (cheap), then a single
``dA = dHᵀ x`` and ``dx += dH A`` replace three of each.

Shared matrices are accumulated in place: with ``accum_a`` / ``accum_b`` (fp32 buffers shaped like A / B)
the gradient is added into the buffer (``addmm_``), with no per-layer temporary of A's or B's size, and
returned as None. These are pure-torch (cuBLAS / oneDNN GEMMs); the gated op of :mod:`.op`
implements the same ``accum_*`` contract in every backend for the ordinary (unsplit) path.
"""
from __future__ import annotations

import torch


def shrink_forward(x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """``H = x Aᵀ``: x [T, K], lora_a [R, K] -> [T, R] in x's dtype (fp32 master A is cast down, as autocast)."""
    return x @ lora_a.to(x.dtype).t()


def shrink_backward(dh: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, need_x: bool, need_a: bool,
                    accum_a: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Returns ``(dx [T, K] | None, dA [R, K] | None)`` for dh [T, R]; dA goes into ``accum_a`` when given."""
    dx = da = None
    if need_x:
        dx = dh @ lora_a.to(dh.dtype)                                           # [T, K]
    if need_a:
        if accum_a is not None:
            accum_a.addmm_(dh.t().to(accum_a.dtype), x.to(accum_a.dtype))
        else:
            da = (dh.t() @ x.to(dh.dtype)).to(lora_a.dtype)                     # [R, K]
    return dx, da


def expand_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor,
                   lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``y = x Wᵀ + b + s · H Bᵀ``: x [T, K], weight [N, K], bias [N], h [T, R], lora_b [N, R] -> [T, N]."""
    cd = x.dtype
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    return y.addmm_(h.to(cd), lora_b.to(cd).t(), alpha=scale)


def expand_backward(dy: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, scale: float,
                    need_x: bool, need_h: bool, need_b: bool, accum_b: torch.Tensor | None = None):
    """Returns ``(dx [T, K], dH [T, R], dB [N, R])`` (None where not needed); dB goes into ``accum_b`` when given."""
    cd = dy.dtype
    dx = dh = db = None
    if need_x:
        dx = dy @ weight.to(cd)                                                 # [T, K]
    if need_h:
        dh = (dy @ lora_b.to(cd)).mul_(scale).to(h.dtype)                       # [T, R]
    if need_b:
        if accum_b is not None:
            accum_b.addmm_(dy.t().to(accum_b.dtype), h.to(accum_b.dtype), alpha=scale)
        else:
            db = (dy.t() @ h.to(cd)).mul_(scale).to(lora_b.dtype)               # [N, R]
    return dx, dh, db
