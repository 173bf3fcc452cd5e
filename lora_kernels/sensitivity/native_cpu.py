"""The ``native`` backend of the sensitivity update: the fused one-pass CPU loop of the compiled CPU module
(csrc/cpu/sensitivity_cpu.cpp), described to it by one int64 table (csrc/sensitivity_table.h).
"""
from __future__ import annotations

import os

import torch

from ..codes import DTYPE_CODES, KIND_E
from ..compiled import cpu_module
from ..dispatch import Problem


def supports(p: Problem) -> tuple[bool, str]:
    if p.device.type != "cpu":
        return False, f"the native loop runs on CPU tensors, got {p.device}"
    if p.dtype not in DTYPE_CODES:
        return False, f"dtype {p.dtype} is not one of the native loop's fp32/fp16/bf16"
    if not p.dense:
        return False, "the native loop needs contiguous params/grads with one dtype per pair"
    return True, "native one-pass CPU loop (lora_kernels._lora_kernels_cpu)"


NATIVE_DTYPES = DTYPE_CODES
# One thread by default: the loop is memory-bound (~11 GB/s on one core), and on the shared 2-core box two
# OpenMP threads measured 28x SLOWER than one (30.8 vs 1.09 ms for MiniLM-L6's 0.5M entries at load ~8).
NATIVE_THREADS = 1


def _flush_denormal_on() -> bool:
    # torch has a setter and no getter: with FTZ/DAZ on, a subnormal input reads as zero.
    return bool(torch.tensor(1e-40, dtype=torch.float32).mul(2.0).item() == 0.0)


FLUSH_ENV = "LORA_KERNELS_FLUSH_DENORMAL"   # "0": the native loop keeps subnormals (exact below 1.2e-38)


def native_update(mod, *args, fn: str = "sensitivity_update"):
    """The native loop with flush-to-zero on (the caller's setting restored after). Gradients that repeat push
    Ū = β2·Ū + (1−β2)·|I − Ī| geometrically into fp32 subnormals, and subnormal arithmetic is microcoded on x86:
    measured on the 2-core EPYC, MiniLM's 72 A/B tensors with Ū at 1e-39: 0.66 → 0.39 ms per update (1.7×).
    Values below 1.2e-38 become 0 (scores of that size are 0 for ranking). NATIVE_THREADS = 1: the loop runs on
    this thread, the one whose MXCSR ``set_flush_denormal`` sets. ``LORA_KERNELS_FLUSH_DENORMAL=0`` turns it off
    (then bf16 weights below 1.2e-38, themselves subnormal, are decoded and used exactly). ``fn``: the module's
    ``sensitivity_update`` (bool) or ``sensitivity_update_checked`` (0/1/2 code, see :func:`has_checked`)."""
    call = getattr(mod, fn)
    if os.environ.get(FLUSH_ENV, "1").strip() == "0":
        return call(*args)
    was_on = _flush_denormal_on()
    if not was_on:
        torch.set_flush_denormal(True)
    try:
        return call(*args)
    finally:
        if not was_on:
            torch.set_flush_denormal(False)


def has_checked(mod) -> bool:
    """Whether the compiled module has ``sensitivity_update_checked`` (weights scanned for NaN/Inf in the same
    pre-pass as the gradients; modules built before it lack it, and callers then check the weights themselves)."""
    return hasattr(mod, "sensitivity_update_checked")


def _native_ok(p: torch.Tensor, g: torch.Tensor) -> bool:
    return (p.is_cpu and g.is_cpu and p.dtype is g.dtype and p.dtype in NATIVE_DTYPES and p.is_contiguous()
            and g.is_contiguous())


def _row_len(kind: int, p: torch.Tensor) -> int:
    return 1 if kind == KIND_E else p.shape[-1]


# Columns the native loop's rows carry per call (csrc/sensitivity_table.h, SensCol); the others are static.
_COL_PARAM, _COL_GRAD, _COL_DTYPE, _NATIVE_COLS = 0, 1, 6, 9


def _native_table(ipt, unc, kinds, score_offsets) -> torch.Tensor:
    """[n, 9] int64 rows for the native loop with the static columns filled (state pointers, numel, kind, row
    length, score offset); the w / g pointers and their dtype code are written per call (:func:`_fill_native`)."""
    return torch.tensor([(0, 0, a.data_ptr(), u.data_ptr(), a.numel(), k, 0, _row_len(k, a), off)
                         for a, u, k, off in zip(ipt, unc, kinds, score_offsets)],
                        dtype=torch.int64).reshape(len(kinds), _NATIVE_COLS)


def _fill_native(rows, param_ptrs, grad_ptrs, codes) -> None:
    rows[:, _COL_PARAM], rows[:, _COL_GRAD], rows[:, _COL_DTYPE] = param_ptrs, grad_ptrs, codes


def fused_sensitivity_update(params, grads, ipt, unc, kinds, score_offsets, scores, beta1, beta2,
                             n_threads: int = NATIVE_THREADS) -> torch.Tensor:
    """The fused one-pass CPU loop (same arguments and semantics as :func:`fused_sensitivity_update`).

    Needs contiguous CPU ``params``/``grads`` of one dtype per pair (fp32, fp16 or bf16); the caller has
    validated shapes (:func:`check_sensitivity_args`). Scores do not depend on ``n_threads`` (per-tensor
    double partial sums are added in tensor order).
    """
    mod = cpu_module.require()
    for j, (p, g) in enumerate(zip(params, grads)):
        if not _native_ok(p, g):
            raise ValueError(f"params[{j}]/grads[{j}] ({p.dtype}/{g.dtype} on {p.device}/{g.device}, contiguous "
                             f"{p.is_contiguous()}/{g.is_contiguous()}): the native CPU loop needs contiguous CPU "
                             f"tensors of one dtype in fp32/fp16/bf16")
    if not params:
        return torch.zeros((), dtype=torch.bool)
    table = _native_table(ipt, unc, kinds, score_offsets)  # must outlive the call
    _fill_native(table.numpy(), [p.data_ptr() for p in params], [g.data_ptr() for g in grads],
                 [NATIVE_DTYPES[p.dtype] for p in params])
    bad = native_update(mod, table.data_ptr(), len(params), scores.data_ptr(), scores.numel(), float(beta1),
                        float(beta2), int(n_threads))
    return torch.tensor(bad)

