"""Triton backend of :func:`lora_kernels.sensitivity.op.fused_sensitivity_update` (ALGORITHMS.md §2).

Multi-tensor by a pointer table: one int64 row per adapter tensor (addresses of p, g, Ī, Ū; numel; kind;
the divisor that maps an element to its rank; the score offset) and one row per program (tensor index,
first element). So the whole model is two launches per dtype group, whatever the number of adapters:
    1. ``_nonfinite_kernel`` raises a device flag if any gradient holds NaN/Inf;
    2. ``_update_kernel`` reads the flag (a skipped step masks every load/store: no host sync), updates
       Ī, Ū in place and atomically adds ``s · w`` into the per-rank scores (w = 1, 1/K or 1/N).
Grouping by kind/shape and launching per group was the alternative; the table keeps the launch count
independent of the model (108 tensors on MiniLM-L6) and works under TRITON_INTERPRET=1.
Inputs are upcast to fp32 right after load (the interpreter computes bf16 wrongly otherwise); scores
accumulate in fp32 (no bf16 atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import Problem

BLOCK = 1024
_NCOL = 8  # p, g, ipt, unc addresses; numel; kind; divisor; score offset

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _nonfinite_kernel(tab_ptr, blk_ptr, flag_ptr, BLOCK: tl.constexpr, G_DTYPE: tl.constexpr):
    pid = tl.program_id(0)
    j = tl.load(blk_ptr + 2 * pid)
    start = tl.load(blk_ptr + 2 * pid + 1)
    row = tab_ptr + j * 8
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
    n = tl.load(row + 4)
    offs = start + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    bad = (g - g) != 0.0  # NaN and ±Inf (isfinite needs libdevice, absent under the interpreter)
    nbad = tl.sum(bad.to(tl.int32), axis=0)
    tl.atomic_max(flag_ptr, (nbad > 0).to(tl.int32))


@triton.jit
def _update_kernel(tab_ptr, wt_ptr, blk_ptr, flag_ptr, scores_ptr, beta1, beta2,
                   BLOCK: tl.constexpr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr):
    pid = tl.program_id(0)
    j = tl.load(blk_ptr + 2 * pid)
    start = tl.load(blk_ptr + 2 * pid + 1)
    row = tab_ptr + j * 8
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
    i_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    u_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    n = tl.load(row + 4)
    kind = tl.load(row + 5)
    div = tl.load(row + 6)
    off = tl.load(row + 7)
    w = tl.load(wt_ptr + j)
    flag = tl.load(flag_ptr)
    offs = start + tl.arange(0, BLOCK)
    m = (offs < n) & (flag == 0)
    p = tl.load(p_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a = tl.load(i_ptr + offs, mask=m, other=0.0)
    u = tl.load(u_ptr + offs, mask=m, other=0.0)
    cur = tl.abs(p * g)
    a = beta1 * a + (1.0 - beta1) * cur
    u = beta2 * u + (1.0 - beta2) * tl.abs(cur - a)  # the updated Ī, as PEFT
    tl.store(i_ptr + offs, a, mask=m)
    tl.store(u_ptr + offs, u, mask=m)
    # kind 0: element e is rank e; kind 1 (A [R,K]): rank e // K; kind 2 (B [N,R]): rank e % R
    rank = tl.where(kind == 0, offs, tl.where(kind == 1, offs // div, offs % div))
    tl.atomic_add(scores_ptr + off + rank, a * u * w, mask=m)


def supports(p: Problem) -> tuple[bool, str]:
    if p.dtype not in _TL_DTYPE:
        return False, f"dtype {p.dtype} not supported by the triton sensitivity kernel (fp32/fp16/bf16)"
    return True, "pointer-table multi-tensor kernel"


def _tables(idx, params, grads, ipt, unc, kinds, offsets, device):
    rows, wts, blks = [], [], []
    for t, j in enumerate(idx):
        p, g, k = params[j], grads[j], kinds[j]
        n = p.numel()
        if k == 0:
            div, wt = 1, 1.0
        elif k == 1:
            div, wt = p.shape[1], 1.0 / p.shape[1]
        else:
            div, wt = p.shape[1], 1.0 / p.shape[0]
        rows.append([p.data_ptr(), g.data_ptr(), ipt[j].data_ptr(), unc[j].data_ptr(), n, k, div, offsets[j]])
        wts.append(wt)
        blks.extend([t, s] for s in range(0, n, BLOCK))
    tab = torch.tensor(rows, dtype=torch.int64, device=device)
    wt = torch.tensor(wts, dtype=torch.float32, device=device)
    blk = torch.tensor(blks, dtype=torch.int64, device=device).reshape(-1, 2)
    return tab, wt, blk


def fused_sensitivity_update(params, grads, ipt, unc, kinds, score_offsets, scores, beta1, beta2) -> torch.Tensor:
    """Same contract as :func:`lora_kernels.sensitivity.op.fused_sensitivity_update` (arguments validated there)."""
    device = scores.device
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    # Strided inputs are copied; the copies live until the launches below are queued (stream-ordered).
    params = [p.contiguous() for p in params]
    grads = [g.contiguous() for g in grads]
    nonempty = [j for j in range(len(params)) if params[j].numel() > 0]
    groups: dict[tuple, list[int]] = {}
    for j in nonempty:
        groups.setdefault((params[j].dtype, grads[j].dtype), []).append(j)
    tables = {key: _tables(idx, params, grads, ipt, unc, kinds, score_offsets, device) for key, idx in groups.items()}
    for (_, gd), (tab, _, blk) in tables.items():
        _nonfinite_kernel[(blk.shape[0],)](tab, blk, flag, BLOCK=BLOCK, G_DTYPE=_TL_DTYPE[gd])
    for (pd, gd), (tab, wt, blk) in tables.items():
        _update_kernel[(blk.shape[0],)](tab, wt, blk, flag, scores, float(beta1), float(beta2),
                                        BLOCK=BLOCK, P_DTYPE=_TL_DTYPE[pd], G_DTYPE=_TL_DTYPE[gd])
    return flag[0] != 0
