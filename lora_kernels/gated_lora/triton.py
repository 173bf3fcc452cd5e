"""Triton backend of the gated LoRA linear (ALGORITHMS.md §1), following the limits of PERFORMANCE.md.

Shape legend: T tokens, K input features, N output features, R rank (padded to BLOCK_R, a power of two
>= 16 because tl.dot needs every dim >= 16; ranks above the block are processed in chunks).

Forward (two launches):
    _shrink_kernel     H = dropout(x) Aᵀ                       [T, R] fp32, one pass over x
    _fwd_gemm_kernel   y = x Wᵀ + b + s·(H ⊙ G) Bᵀ             expand fused into the base GEMM's epilogue:
                       each output tile reads its [BLOCK_M, R] slice of H instead of recomputing the shrink
Backward (three launches):
    _bwd_dy_kernel     dZ = s·dy B, dH = dZ ⊙ G, dG = dZ ⊙ H, dB += s·dyᵀ(H ⊙ G)   one pass over dy
    _bwd_dx_kernel     dx = dy W + mask ⊙ (dH A)               dH·A fused into the dx GEMM's epilogue
    _bwd_da_kernel     dA = dHᵀ dropout(x)                     one pass over x, written or added in place

Dropout is regenerated from the seed with exactly the hash of :func:`lora_kernels.reference.dropout_keep`.
dB and the per-rank dG are accumulated over token tiles with fp32 atomics (one pass over dy instead of
two), so they are not bit-for-bit deterministic run to run; everything else is.
Inputs may be non-contiguous: every kernel takes strides. All arithmetic is fp32; tl.dot operands are
cast to x's dtype on the GPU (tensor cores) and to fp32 under the interpreter, whose bf16 dot is wrong.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from .. import _alloc
from ..codes import GATE_CODES as _GATE_CODE
from ..codes import GATE_NONE, GATE_RANK, GATE_TOKEN, gate_kind
from .reference import dropout_threshold

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
SUPPORTED_DTYPES = tuple(_TL_DTYPE)


# ----------------------------------------------------------------------------------------------- kernels

@triton.jit
def _fmix32(h):
    # murmur3 finaliser on uint32: the multiplications wrap mod 2^32 like reference._fmix32's masking.
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    h = h ^ (h >> 16)
    return h


@triton.jit
def dropout_keep(seed, rows, cols, threshold):
    """Keep mask for the grid of int ``rows`` [M, 1] x ``cols`` [1, N]; bit-identical to reference.dropout_keep.

    ``seed`` and ``threshold`` are int32 scalars (the seed's uint32 bit pattern, round(p·2^24))."""
    s = seed.to(tl.uint32, bitcast=True)
    hr = _fmix32(s + rows.to(tl.uint32) * 0x9E3779B9)
    h = _fmix32(hr ^ (cols.to(tl.uint32) * 0x85EBCA6B))
    return (h >> 8) >= threshold.to(tl.uint32)


@triton.jit
def _grouped_pid(pid, num_m, num_n, GROUP_M: tl.constexpr):
    # Groups of GROUP_M row-tiles sweep the columns together so their x rows stay in L2.
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size, (pid % in_group) // size


@triton.jit
def _dropout_mask_kernel(out_ptr, T, K, seed, threshold, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    # Test vehicle: writes the 0/1 keep mask so tests compare it with reference.dropout_keep bit-for-bit.
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, rows[:, None], cols[None, :], threshold)
    m = (rows[:, None] < T) & (cols[None, :] < K)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], keep.to(tl.int8), mask=m)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, h_ptr,
    T, K, R,
    sxt, sxk, sar, sak,
    seed, threshold, inv_keep,
    DROPOUT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_T: tl.constexpr, PREC: tl.constexpr,
):
    # grid (cdiv(T, BLOCK_T), cdiv(R, BLOCK_R)); h is contiguous fp32 [T, R].
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    tmask, rmask = offs_t < T, offs_r < R
    rows = offs_t.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * sxt + offs_k[None, :] * sxk,
                    mask=tmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        if DROPOUT:
            keep = dropout_keep(seed, offs_t[:, None], offs_k[None, :], threshold)
            x = tl.where(keep, x * inv_keep, 0.0)
        at = tl.load(a_ptr + offs_r[None, :] * sar + offs_k[:, None] * sak,
                     mask=kmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)  # Aᵀ tile [BK, BR]
        acc = tl.dot(x.to(DOT_T), at.to(DOT_T), acc, input_precision=PREC)
    tl.store(h_ptr + rows[:, None] * R + offs_r[None, :], acc, mask=tmask[:, None] & rmask[None, :])


@triton.jit
def _load_gate(g_ptr, rows, offs_r, mask2, sgt, sgr):
    # One load for both gate kinds: a per-rank gate is passed with token stride 0 (L1 serves the repeats).
    return tl.load(g_ptr + rows[:, None] * sgt + offs_r[None, :] * sgr, mask=mask2, other=0.0).to(tl.float32)


@triton.jit
def _gemm_rows(a_ptr, b_ptr, rows, rmask, cols, cmask, L, sa_row, sa_l, sb_l, sb_col,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_T: tl.constexpr,
               PREC: tl.constexpr):
    """fp32 tile [BLOCK_M, BLOCK_N] of A [M, L] @ B [L, C] for rows ``rows`` and columns ``cols`` (both strided):
    the main loop the base GEMM (x Wᵀ) and the dx GEMM (dy W) share; their epilogues differ."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_K):
        offs_l = l0 + tl.arange(0, BLOCK_K)
        lmask = offs_l < L
        a = tl.load(a_ptr + rows[:, None] * sa_row + offs_l[None, :] * sa_l,
                    mask=rmask[:, None] & lmask[None, :], other=0.0).to(tl.float32)        # [BM, BK]
        b = tl.load(b_ptr + offs_l[:, None] * sb_l + cols[None, :] * sb_col,
                    mask=lmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)        # [BK, BN]
        acc = tl.dot(a.to(DOT_T), b.to(DOT_T), acc, input_precision=PREC)
    return acc


@triton.jit
def _gemm_tile(a_ptr, b_ptr, M, C, L, sa_row, sa_l, sb_l, sb_col,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
               DOT_T: tl.constexpr, PREC: tl.constexpr):
    """This program's output tile of A [M, L] @ B [L, C] on a 1-D grid of cdiv(M, BLOCK_M) * cdiv(C, BLOCK_N)
    programs in grouped order: ``(offs_m, rows (int64), mmask, offs_c, cmask, acc)`` for the kernel's epilogue."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(C, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, cmask = offs_m < M, offs_c < C
    rows = offs_m.to(tl.int64)
    acc = _gemm_rows(a_ptr, b_ptr, rows, mmask, offs_c, cmask, L, sa_row, sa_l, sb_l, sb_col, BLOCK_M, BLOCK_N,
                     BLOCK_K, DOT_T, PREC)
    return offs_m, rows, mmask, offs_c, cmask, acc


@triton.jit
def _fwd_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, g_ptr, b_ptr, y_ptr,
    T, N, K, R,
    sxt, sxk, swn, swk, sgt, sgr, sbn, sbr,
    scale,
    HAS_BIAS: tl.constexpr, GATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
):
    # grid (cdiv(T, BLOCK_M) * cdiv(N, BLOCK_N),); y is contiguous [T, N] in x's dtype.
    # x [T, K] @ Wᵀ [K, N]
    offs_m, rows, mmask, offs_n, nmask, acc = _gemm_tile(x_ptr, w_ptr, T, N, K, sxt, sxk, swk, swn,
                                                         BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, DOT_T, PREC)
    # Epilogue: the expand s·(H ⊙ G) Bᵀ from the saved H, rank chunk by rank chunk.
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        rmask = offs_r < R
        hmask = mmask[:, None] & rmask[None, :]
        hg = tl.load(h_ptr + rows[:, None] * R + offs_r[None, :], mask=hmask, other=0.0) * scale
        if GATE != 0:
            hg = hg * _load_gate(g_ptr, rows, offs_r, hmask, sgt, sgr)
        bt = tl.load(b_ptr + offs_r[:, None] * sbr + offs_n[None, :] * sbn,
                     mask=rmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)  # Bᵀ tile [BR, BN]
        acc = tl.dot(hg.to(DOT_T), bt.to(DOT_T), acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _bwd_dy_kernel(
    dy_ptr, b_ptr, h_ptr, g_ptr, dh_ptr, dg_ptr, db_ptr,
    T, N, R,
    sdt, sdn, sbn, sbr, sgt, sgr,
    scale,
    GATE: tl.constexpr, NEED_DZ: tl.constexpr, STORE_DH: tl.constexpr, NEED_DG: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
):
    # grid (cdiv(T, BLOCK_T), cdiv(R, BLOCK_R)). h, dh: contiguous fp32 [T, R]; db: contiguous fp32 [N, R]
    # (atomics); dg: [T, R] contiguous in the gate's dtype (token gate) or fp32 [R] (rank gate, atomics).
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    tmask, rmask = offs_t < T, offs_r < R
    rows = offs_t.to(tl.int64)
    tr_mask = tmask[:, None] & rmask[None, :]
    h = tl.load(h_ptr + rows[:, None] * R + offs_r[None, :], mask=tr_mask, other=0.0)
    g = tl.full((1, BLOCK_R), 1.0, tl.float32)
    if GATE != 0:
        g = _load_gate(g_ptr, rows, offs_r, tr_mask, sgt, sgr)
    hg = (h * g * scale).to(DOT_T)  # [BT, BR]
    dz = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        dy = tl.load(dy_ptr + rows[:, None] * sdt + offs_n[None, :] * sdn,
                     mask=tmask[:, None] & nmask[None, :], other=0.0).to(tl.float32).to(DOT_T)
        if NEED_DZ:
            b = tl.load(b_ptr + offs_n[:, None] * sbn + offs_r[None, :] * sbr,
                        mask=nmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)  # [BN, BR]
            dz = tl.dot(dy, b.to(DOT_T), dz, input_precision=PREC)
        if NEED_DB:
            part = tl.dot(tl.trans(dy), hg, input_precision=PREC)  # [BN, BR]
            tl.atomic_add(db_ptr + offs_n[:, None] * R + offs_r[None, :], part,
                          mask=nmask[:, None] & rmask[None, :], sem="relaxed")
    if NEED_DZ:
        dz = dz * scale
        if STORE_DH:
            tl.store(dh_ptr + rows[:, None] * R + offs_r[None, :], dz * g, mask=tr_mask)
        if NEED_DG:
            dg = dz * h
            if GATE == 1:
                tl.atomic_add(dg_ptr + offs_r, tl.sum(dg, axis=0), mask=rmask, sem="relaxed")
            else:
                tl.store(dg_ptr + rows[:, None] * R + offs_r[None, :], dg.to(dg_ptr.dtype.element_ty), mask=tr_mask)


@triton.jit
def _bwd_dx_kernel(
    dy_ptr, w_ptr, dh_ptr, a_ptr, dx_ptr,
    T, K, N, R,
    sdt, sdn, swn, swk, sar, sak,
    seed, threshold, inv_keep,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
):
    # grid (cdiv(T, BLOCK_M) * cdiv(K, BLOCK_N),): output tile [BLOCK_M, BLOCK_N] of dx [T, K] (contiguous),
    # reduction over N in steps of BLOCK_K.
    # dy [T, N] @ W [N, K]
    offs_m, rows, mmask, offs_c, cmask, acc = _gemm_tile(dy_ptr, w_ptr, T, K, N, sdt, sdn, swn, swk,
                                                         BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, DOT_T, PREC)
    # Epilogue: mask ⊙ (dH A), the LoRA part of dx, from the dH the dy pass saved.
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        rmask = offs_r < R
        dh = tl.load(dh_ptr + rows[:, None] * R + offs_r[None, :], mask=mmask[:, None] & rmask[None, :], other=0.0)
        a = tl.load(a_ptr + offs_r[:, None] * sar + offs_c[None, :] * sak,
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)  # [BR, BN]
        lora = tl.dot(dh.to(DOT_T), a.to(DOT_T), lora, input_precision=PREC)
    if DROPOUT:
        keep = dropout_keep(seed, offs_m[:, None], offs_c[None, :], threshold)
        lora = tl.where(keep, lora * inv_keep, 0.0)
    acc += lora
    tl.store(dx_ptr + rows[:, None] * K + offs_c[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=mmask[:, None] & cmask[None, :])


@triton.jit
def _bwd_da_kernel(
    x_ptr, dh_ptr, da_ptr,
    T, K, R,
    sxt, sxk,
    seed, threshold, inv_keep,
    ACCUM: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
):
    # grid (cdiv(K, BLOCK_K), cdiv(R, BLOCK_R)); each program owns da[r-chunk, k-chunk] (contiguous [R, K]),
    # so ACCUM (ShareLoRA's shared fp32 buffer) is a plain read-add-write, no atomics.
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    kmask, rmask = offs_k < K, offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        tmask = offs_t < T
        rows = offs_t.to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * sxt + offs_k[None, :] * sxk,
                    mask=tmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        if DROPOUT:
            keep = dropout_keep(seed, offs_t[:, None], offs_k[None, :], threshold)
            x = tl.where(keep, x * inv_keep, 0.0)
        dht = tl.load(dh_ptr + rows[None, :] * R + offs_r[:, None],
                      mask=rmask[:, None] & tmask[None, :], other=0.0)  # dHᵀ tile [BR, BT]
        acc = tl.dot(dht.to(DOT_T), x.to(DOT_T), acc, input_precision=PREC)
    ptrs = da_ptr + offs_r[:, None].to(tl.int64) * K + offs_k[None, :]
    m = rmask[:, None] & kmask[None, :]
    if ACCUM:
        acc += tl.load(ptrs, mask=m, other=0.0)
    tl.store(ptrs, acc.to(da_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------- AOT metadata

@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """What an ahead-of-time compile of one kernel needs. ``pointers`` maps each pointer argument to its
    role ("x": x's dtype, "adapter": lora_a/lora_b's dtype (fp32 here: the mixed case), "gate": fp32,
    "f32": fp32 buffer, "i8"); ``floats`` are fp32 scalars; every other non-constexpr argument is i32.
    ``variants`` are ``(constexprs, x_dtype, options)`` triples: together they compile every constexpr
    value and every input dtype at least once (DOT_T/PREC follow x's dtype, see :meth:`constexprs`)."""
    fn: object
    pointers: dict
    floats: tuple
    variants: tuple

    def signature(self, x_dtype: torch.dtype, constexprs: dict) -> dict:
        code = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
        role = {"x": code[x_dtype], "adapter": "fp32", "gate": "fp32", "f32": "fp32", "i8": "i8"}
        sig = {}
        for name in self.fn.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in self.pointers:
                sig[name] = "*" + role[self.pointers[name]]
            else:
                sig[name] = "fp32" if name in self.floats else "i32"
        return sig

    def constexprs(self, variant: dict, x_dtype: torch.dtype) -> dict:
        """``variant`` plus DOT_T/PREC for a GPU compile with inputs of ``x_dtype``."""
        out = dict(variant)
        if "DOT_T" in self.fn.arg_names:
            out["DOT_T"], out["PREC"] = _gpu_dot_config(x_dtype)
        return out


_F16, _BF16, _F32 = torch.float16, torch.bfloat16, torch.float32
# Small tiles keep compiles short (an fp32 128x128 IEEE GEMM takes ~65 s in ptxas); one variant per GEMM
# uses the real H100 launch config (TILES defaults, 8 warps, 3 stages) so its shared memory is checked too.
_GEMM_SMALL = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_R": 16, "GROUP_M": 8}
_GEMM_REAL = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_R": 64, "GROUP_M": 8}
_REAL_OPTS = {"num_warps": 8, "num_stages": 3}
_SKINNY = {"BLOCK_T": 64, "BLOCK_R": 16}
KERNELS = [
    KernelSpec(_dropout_mask_kernel, {"out_ptr": "i8"}, (),
               (({"BLOCK_T": 32, "BLOCK_K": 32}, _F32, {}),)),
    KernelSpec(_shrink_kernel, {"x_ptr": "x", "a_ptr": "adapter", "h_ptr": "f32"}, ("inv_keep",), (
        ({"DROPOUT": False, "BLOCK_K": 64, **_SKINNY}, _BF16, {}),
        ({"DROPOUT": True, "BLOCK_K": 64, **_SKINNY, "BLOCK_R": 128}, _F16, {}),
        ({"DROPOUT": True, "BLOCK_K": 32, **_SKINNY}, _F32, {}))),
    KernelSpec(_fwd_gemm_kernel, {"x_ptr": "x", "w_ptr": "x", "bias_ptr": "x", "h_ptr": "f32", "g_ptr": "gate",
                                  "b_ptr": "adapter", "y_ptr": "x"}, ("scale",), (
        ({"HAS_BIAS": True, "GATE": GATE_NONE, **_GEMM_REAL}, _BF16, _REAL_OPTS),
        ({"HAS_BIAS": False, "GATE": GATE_RANK, **_GEMM_SMALL}, _F16, {}),
        ({"HAS_BIAS": True, "GATE": GATE_TOKEN, **_GEMM_SMALL}, _F32, {}))),
    KernelSpec(_bwd_dy_kernel, {"dy_ptr": "x", "b_ptr": "adapter", "h_ptr": "f32", "g_ptr": "gate",
                                "dh_ptr": "f32", "dg_ptr": "gate", "db_ptr": "f32"}, ("scale",), (
        ({"GATE": GATE_NONE, "NEED_DZ": True, "STORE_DH": True, "NEED_DG": False, "NEED_DB": True,
          "BLOCK_N": 64, **_SKINNY}, _BF16, {}),
        ({"GATE": GATE_RANK, "NEED_DZ": True, "STORE_DH": True, "NEED_DG": True, "NEED_DB": True,
          "BLOCK_N": 64, **_SKINNY}, _F16, {}),
        ({"GATE": GATE_TOKEN, "NEED_DZ": True, "STORE_DH": False, "NEED_DG": True, "NEED_DB": False,
          "BLOCK_N": 32, **_SKINNY}, _F32, {}))),
    KernelSpec(_bwd_dx_kernel, {"dy_ptr": "x", "w_ptr": "x", "dh_ptr": "f32", "a_ptr": "adapter", "dx_ptr": "x"},
               ("inv_keep",), (
        ({"DROPOUT": True, **_GEMM_REAL}, _BF16, _REAL_OPTS),
        ({"DROPOUT": False, **_GEMM_SMALL}, _F16, {}),
        ({"DROPOUT": True, **_GEMM_SMALL}, _F32, {}))),
    KernelSpec(_bwd_da_kernel, {"x_ptr": "x", "dh_ptr": "f32", "da_ptr": "adapter"}, ("inv_keep",), (
        ({"ACCUM": False, "DROPOUT": True, "BLOCK_K": 64, **_SKINNY}, _BF16, {}),
        ({"ACCUM": True, "DROPOUT": False, "BLOCK_K": 64, **_SKINNY}, _F16, {}),
        ({"ACCUM": True, "DROPOUT": True, "BLOCK_K": 32, **_SKINNY}, _F32, {}))),
]


# ------------------------------------------------------------------------------------------- launchers

@dataclasses.dataclass(frozen=True)
class Tiles:
    """Block sizes. The defaults suit an H100 (128x128 GEMM tiles, 8 warps); tests shrink them so small
    shapes still cover several tiles under the interpreter."""
    gemm_m: int = 128
    gemm_n: int = 128
    gemm_k: int = 64       # halved for fp32 inputs: 3 stages of 128x64 fp32 tiles overflow an A100's smem
    gemm_r_max: int = 64   # rank chunk in the GEMM epilogues: bounds the [BLOCK_M, BLOCK_R] fp32 registers
    gemm_warps: int = 8
    gemm_stages: int = 3
    group_m: int = 8
    skinny_t: int = 64     # shrink, dy pass, dA: token tile
    skinny_k: int = 64     # their K (or N) tile
    skinny_r_max: int = 128
    skinny_warps: int = 4


TILES = Tiles()


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _gpu_dot_config(dtype: torch.dtype) -> tuple[object, str]:
    # fp32 inputs get IEEE products: tf32's 10-bit mantissa would miss fp32's tolerance.
    if dtype == torch.float32:
        return tl.float32, "ieee"
    return _TL_DTYPE[dtype], "tf32"


def dot_config(dtype: torch.dtype) -> tuple[object, str]:
    """(DOT_T, PREC) for tl.dot operands given x's dtype. The interpreter's bf16 dot is wrong (measured:
    garbage of order 1e10), so under it every dot runs on fp32 operands."""
    if _interpret():
        return tl.float32, "ieee"
    return _gpu_dot_config(dtype)


def _block_r(R: int, cap: int) -> int:
    return min(max(16, triton.next_power_of_2(max(R, 1))), cap)


def _seed32(seed: int) -> int:
    # The kernel reinterprets an int32 as the seed's uint32 bit pattern (reference masks seed & 0xFFFFFFFF).
    s = int(seed) & 0xFFFFFFFF
    return s - (1 << 32) if s >= (1 << 31) else s


def _dropout_args(dropout_p: float, seed: int) -> tuple[bool, int, int, float]:
    p = float(dropout_p)
    if p <= 0:
        return False, 0, 0, 1.0
    return True, _seed32(seed), dropout_threshold(p), 1.0 / (1.0 - p)


def supports(problem) -> tuple[bool, str]:
    """Accepts fp16/bf16/fp32 on CUDA (or CPU under TRITON_INTERPRET=1), every gate kind, dropout, any rank."""
    if problem.op != "gated_lora":
        return False, f"triton_gated implements op 'gated_lora', not {problem.op!r}"
    if problem.dtype not in SUPPORTED_DTYPES:
        return False, (f"dtype {problem.dtype} not supported (fp16/bf16/fp32 only): tl.dot has no float64 "
                       "tensor-core path; the torch backend serves float64 (gradcheck)")
    if problem.device.type == "cpu" and not _interpret():
        return False, "CPU tensors need TRITON_INTERPRET=1"
    if problem.device.type not in ("cpu", "cuda"):
        return False, f"device {problem.device} is neither cuda nor cpu (interpreter)"
    return True, "triton: shrink + base GEMM with fused expand; dy pass + dx GEMM with fused dH·A + dA pass"


def _gate_strides(gate, kind) -> tuple[int, int]:
    if kind == "token":
        return gate.stride(0), gate.stride(1)
    if kind == "rank":
        return 0, gate.stride(0)
    return 0, 0


def gated_lora_forward(x, weight, bias, lora_a, lora_b, scale, gate=None, dropout_p=0.0, seed=0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(y [T, N] in x.dtype, h [T, R] fp32)``, ``h = dropout(x) Aᵀ`` ungated (saved for backward).

    Same semantics as :func:`.reference.gated_lora_forward`; inputs (validated by :mod:`.op`) may be
    non-contiguous."""
    kind = gate_kind(gate)
    T, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    y = _alloc.empty(T, N, dtype=x.dtype, device=x.device)
    h = _alloc.empty(T, R, dtype=torch.float32, device=x.device)
    if T == 0 or N == 0:
        return y, h
    dot_t, prec = dot_config(x.dtype)
    use_drop, seed32, thr, inv_keep = _dropout_args(dropout_p, seed)
    c = TILES
    if R > 0:
        br = _block_r(R, c.skinny_r_max)
        _shrink_kernel[(triton.cdiv(T, c.skinny_t), triton.cdiv(R, br))](
            x, lora_a, h, T, K, R, x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1),
            seed32, thr, inv_keep, DROPOUT=use_drop, BLOCK_T=c.skinny_t, BLOCK_K=c.skinny_k, BLOCK_R=br,
            DOT_T=dot_t, PREC=prec, num_warps=c.skinny_warps)
    sgt, sgr = _gate_strides(gate, kind)
    bk = c.gemm_k if x.dtype != torch.float32 else max(16, c.gemm_k // 2)
    bias_c = bias.contiguous() if bias is not None else y
    grid = (triton.cdiv(T, c.gemm_m) * triton.cdiv(N, c.gemm_n),)
    _fwd_gemm_kernel[grid](
        x, weight, bias_c, h, gate if gate is not None else h, lora_b, y,
        T, N, K, R, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), sgt, sgr,
        lora_b.stride(0), lora_b.stride(1), float(scale),
        HAS_BIAS=bias is not None, GATE=_GATE_CODE[kind], BLOCK_M=c.gemm_m, BLOCK_N=c.gemm_n, BLOCK_K=bk,
        BLOCK_R=_block_r(R, c.gemm_r_max), GROUP_M=c.group_m, DOT_T=dot_t, PREC=prec,
        num_warps=c.gemm_warps, num_stages=c.gemm_stages)
    return y, h


def gated_lora_backward(dy, x, weight, lora_a, lora_b, h, scale, gate=None, dropout_p=0.0, seed=0,
                        needs=(True, True, True, True), accum_a=None, accum_b=None) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dx [T,K] in dy.dtype, dA [R,K] in lora_a.dtype, dB [N,R] in lora_b.dtype,
    dG [R] or [T,R] in gate.dtype)``; same semantics as :func:`.reference.gated_lora_backward`.

    Entries of ``needs`` (dx, dA, dB, dG) that are False come back as None and their work is skipped.
    With ``accum_a`` / ``accum_b`` the gradient is added into the buffer in place and returned as None.
    dB and a per-rank dG are summed over token tiles with fp32 atomics (not bit-reproducible)."""
    kind = gate_kind(gate)
    T, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    need_x, need_a, need_b, need_g = (bool(v) for v in needs)
    need_g = need_g and gate is not None

    dx = da = db = dg = None
    dev = x.device
    if need_x:
        dx = _alloc.empty(T, K, dtype=dy.dtype, device=dev)
    if need_a and accum_a is None:
        # T == 0: nothing to sum over, the kernel does not run.
        da = _alloc.empty(R, K, dtype=lora_a.dtype, device=dev) if T > 0 else torch.zeros_like(lora_a)
    db_buf = None
    if need_b:
        db_buf = accum_b if accum_b is not None else torch.zeros(N, R, dtype=torch.float32, device=dev)
    dg_buf = None
    if need_g:
        dg_buf = (torch.zeros(R, dtype=torch.float32, device=dev) if kind == "rank"
                  else _alloc.empty(T, R, dtype=gate.dtype, device=dev))

    dot_t, prec = dot_config(x.dtype)
    use_drop, seed32, thr, inv_keep = _dropout_args(dropout_p, seed)
    c = TILES
    h32 = h if (h.dtype == torch.float32 and h.is_contiguous()) else h.float().contiguous()
    store_dh = (need_x or need_a) and R > 0
    dh = _alloc.empty(T, R, dtype=torch.float32, device=dev) if store_dh else h32
    need_dz = need_x or need_a or need_g
    br = _block_r(R, c.skinny_r_max)
    if T > 0 and R > 0 and (need_dz or need_b):
        sgt, sgr = _gate_strides(gate, kind)
        _bwd_dy_kernel[(triton.cdiv(T, c.skinny_t), triton.cdiv(R, br))](
            dy, lora_b, h32, gate if gate is not None else h32, dh,
            dg_buf if dg_buf is not None else h32, db_buf if db_buf is not None else h32,
            T, N, R, dy.stride(0), dy.stride(1), lora_b.stride(0), lora_b.stride(1), sgt, sgr, float(scale),
            GATE=_GATE_CODE[kind], NEED_DZ=need_dz, STORE_DH=store_dh, NEED_DG=need_g, NEED_DB=need_b,
            BLOCK_T=c.skinny_t, BLOCK_N=c.skinny_k, BLOCK_R=br, DOT_T=dot_t, PREC=prec, num_warps=c.skinny_warps)
    if need_x and T > 0 and K > 0:
        bk = c.gemm_k if x.dtype != torch.float32 else max(16, c.gemm_k // 2)
        _bwd_dx_kernel[(triton.cdiv(T, c.gemm_m) * triton.cdiv(K, c.gemm_n),)](
            dy, weight, dh, lora_a, dx, T, K, N, R, dy.stride(0), dy.stride(1),
            weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1), seed32, thr, inv_keep,
            DROPOUT=use_drop, BLOCK_M=c.gemm_m, BLOCK_N=c.gemm_n, BLOCK_K=bk,
            BLOCK_R=_block_r(R, c.gemm_r_max), GROUP_M=c.group_m, DOT_T=dot_t, PREC=prec,
            num_warps=c.gemm_warps, num_stages=c.gemm_stages)
    if need_a and T > 0 and K > 0 and R > 0:
        target = accum_a if accum_a is not None else da
        _bwd_da_kernel[(triton.cdiv(K, c.skinny_k), triton.cdiv(R, br))](
            x, dh, target, T, K, R, x.stride(0), x.stride(1), seed32, thr, inv_keep,
            ACCUM=accum_a is not None, DROPOUT=use_drop, BLOCK_T=c.skinny_t, BLOCK_K=c.skinny_k, BLOCK_R=br,
            DOT_T=dot_t, PREC=prec, num_warps=c.skinny_warps)
    if need_b and accum_b is None:
        db = db_buf.to(lora_b.dtype)
    if need_g:
        dg = dg_buf.to(gate.dtype)
    return dx, da, db, dg


def dropout_keep_mask(seed: int, T: int, K: int, p: float, device) -> torch.Tensor:
    """The kernels' keep decision as a bool [T, K] tensor (for tests against reference.dropout_keep)."""
    out = _alloc.empty(T, K, dtype=torch.int8, device=device)
    if T and K:
        _dropout_mask_kernel[(triton.cdiv(T, 32), triton.cdiv(K, 32))](
            out, T, K, _seed32(seed), dropout_threshold(p), BLOCK_T=32, BLOCK_K=32)
    return out.bool()
