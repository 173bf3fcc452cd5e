"""CUDA backend of the fused AdaLoRA sensitivity update (ALGORITHMS.md §2), kernel in csrc/sensitivity.cu.

One launch (after a small non-finite check launch) updates the EMA state of every adapter tensor and
reduces per rank; the tensors are described to the device by one int64 table. Same signature and
semantics as the torch / Triton versions in :mod:`lora_kernels.sensitivity`.
"""
from __future__ import annotations

import torch

from . import _cuda_loader
from .dispatch import Problem

KERNEL_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # = module DTYPE_F32/F16/BF16
KIND_E, KIND_A, KIND_B = 0, 1, 2


def supports(p: Problem) -> tuple[bool, str]:
    if p.device.type != "cuda":
        return False, f"the CUDA backend needs CUDA tensors, got device {p.device}"
    if p.dtype not in KERNEL_DTYPES:
        return False, f"dtype {p.dtype} is not supported by the CUDA kernel (fp32, fp16, bf16)"
    return True, "fused multi-tensor CUDA kernel"


def _ranks_and_row_len(j: int, p: torch.Tensor, kind: int) -> tuple[int, int]:
    if kind == KIND_E:
        if p.dim() != 1:
            raise ValueError(f"params[{j}] has kind 0 (E [R]) but shape {tuple(p.shape)}")
        return p.shape[0], 1
    if p.dim() != 2:
        raise ValueError(f"params[{j}] has kind {kind} ({'A [R, K]' if kind == KIND_A else 'B [N, R]'}) "
                         f"but shape {tuple(p.shape)}")
    return (p.shape[0], p.shape[1]) if kind == KIND_A else (p.shape[1], p.shape[1])


def check_sensitivity_args(params, grads, ipt, unc, kinds, score_offsets, scores, beta1, beta2,
                           require_cuda: bool = True) -> list[tuple[int, int]]:
    """Validates every argument of :func:`fused_sensitivity_update`; returns ``(R_j, row_len_j)`` per tensor."""
    n = len(params)
    for name, seq in (("grads", grads), ("ipt", ipt), ("unc", unc), ("kinds", kinds), ("score_offsets", score_offsets)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries but params has {n}")
    if not isinstance(scores, torch.Tensor) or scores.dtype != torch.float32 or scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D fp32 tensor, got "
                         f"{(scores.dtype, tuple(scores.shape)) if isinstance(scores, torch.Tensor) else scores!r}")
    if not scores.is_contiguous():
        raise ValueError("scores must be contiguous (it is accumulated into in place)")
    if require_cuda and scores.device.type != "cuda":
        raise ValueError(f"scores is on {scores.device}: the CUDA backend needs CUDA tensors")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {beta}")
    out = []
    for j in range(n):
        p, g, i, u, kind, off = params[j], grads[j], ipt[j], unc[j], kinds[j], score_offsets[j]
        if kind not in (KIND_E, KIND_A, KIND_B):
            raise ValueError(f"kinds[{j}] must be 0 (E), 1 (A) or 2 (B), got {kind!r}")
        if p.dtype not in KERNEL_DTYPES:
            raise TypeError(f"params[{j}] has dtype {p.dtype}; the CUDA kernel takes fp32, fp16 or bf16")
        if g is None or g.shape != p.shape or g.dtype != p.dtype:
            raise ValueError(f"grads[{j}] must match params[{j}] ({p.dtype} {tuple(p.shape)}), got "
                             f"{None if g is None else (g.dtype, tuple(g.shape))}")
        for name, st in (("ipt", i), ("unc", u)):
            if st.shape != p.shape or st.dtype != torch.float32 or not st.is_contiguous():
                raise ValueError(f"{name}[{j}] must be a contiguous fp32 tensor of shape {tuple(p.shape)}, got "
                                 f"{st.dtype} {tuple(st.shape)}{'' if st.is_contiguous() else ' (non-contiguous)'}")
        for name, t in ((f"params[{j}]", p), (f"grads[{j}]", g), (f"ipt[{j}]", i), (f"unc[{j}]", u)):
            if t.device != scores.device:
                raise ValueError(f"{name} is on {t.device} but scores is on {scores.device}")
        R, row_len = _ranks_and_row_len(j, p, kind)
        if isinstance(off, bool) or not isinstance(off, int) or off < 0 or off + R > scores.numel():
            raise ValueError(f"score_offsets[{j}] = {off!r}: its {R} ranks must fit in scores "
                             f"(length {scores.numel()})")
        out.append((R, row_len))
    return out


def fused_sensitivity_update(
    params: list[torch.Tensor],      # E [R] | A [R, K] | B [N, R], fp32/fp16/bf16
    grads: list[torch.Tensor],       # same shapes and dtypes
    ipt: list[torch.Tensor],         # fp32, same shapes: EMA of I = |w·g| (updated in place)
    unc: list[torch.Tensor],         # fp32, same shapes: EMA of |I − ipt| (updated in place)
    kinds: list[int],                # 0 = E, 1 = A, 2 = B
    score_offsets: list[int],        # start of each adapter's ranks in scores
    scores: torch.Tensor,            # fp32 [total_R], accumulated into (the caller zeroes it)
    beta1: float,
    beta2: float,
) -> torch.Tensor:
    """Updates every adapter's EMA state and adds its rank-triplet scores (s(λ_i), mean_k s(A_ik),
    mean_n s(B_ni)) into ``scores``. Returns a 0-dim bool tensor on the device, True when a gradient held
    NaN/Inf, in which case nothing was written. No host synchronisation. Scores are summed with fp32
    atomics, so their last bits depend on block order (not deterministic)."""
    shapes = check_sensitivity_args(params, grads, ipt, unc, kinds, score_offsets, scores, beta1, beta2)
    flag = torch.zeros((), dtype=torch.bool, device=scores.device)
    with torch.cuda.device(scores.device):
        mod = _cuda_loader.require()
        chunk = mod.SENS_CHUNK
        rows, keep, begin = [], [], 0
        for j, (_, row_len) in enumerate(shapes):
            numel = params[j].numel()
            if numel == 0:
                continue
            p, g = params[j].detach().contiguous(), grads[j].detach().contiguous()
            keep += [p, g]  # contiguous copies must outlive the launch (stream-ordered reuse makes this enough)
            rows.append([p.data_ptr(), g.data_ptr(), ipt[j].data_ptr(), unc[j].data_ptr(), numel, kinds[j],
                         KERNEL_DTYPES[p.dtype], row_len, score_offsets[j], begin])
            begin += -(-numel // chunk)
        if not rows:
            return flag
        # Pinned + non_blocking: the table copy is queued on the stream without a host sync.
        table = torch.tensor(rows, dtype=torch.int64).pin_memory().to(scores.device, non_blocking=True)
        if table.shape[1] != mod.SENS_TABLE_COLS:
            raise RuntimeError(f"the compiled module expects {mod.SENS_TABLE_COLS} table columns, this wrapper "
                               f"writes {table.shape[1]}: rebuild it (`pip install -e .`)")
        mod.sensitivity_update(table_ptr=table.data_ptr(), n_tensors=len(rows), total_chunks=begin,
                               scores_ptr=scores.data_ptr(), nonfinite_ptr=flag.data_ptr(), beta1=float(beta1),
                               beta2=float(beta2), stream=torch.cuda.current_stream(scores.device).cuda_stream)
    return flag
