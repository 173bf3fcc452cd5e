"""CUDA backend of the fused AdaLoRA sensitivity update (ALGORITHMS.md §2), kernel in csrc/sensitivity.cu.

One launch (after a small non-finite check launch) updates the EMA state of every adapter tensor and
reduces per rank; the tensors are described to the device by one int64 table. Same signature and
semantics as :mod:`.reference`; arguments were validated by :mod:`.op`.
"""
from __future__ import annotations

import torch

from ..codes import DTYPE_CODES as KERNEL_DTYPES
from ..codes import KIND_A, KIND_E
from ..compiled import cuda_module
from ..dispatch import Problem


def supports(p: Problem) -> tuple[bool, str]:
    if p.device.type != "cuda":
        return False, f"the CUDA backend needs CUDA tensors, got device {p.device}"
    if p.dtype not in KERNEL_DTYPES:
        return False, f"dtype {p.dtype} is not supported by the CUDA kernel (fp32, fp16, bf16)"
    return True, "fused multi-tensor CUDA kernel"


def _ranks_and_row_len(p: torch.Tensor, kind: int) -> tuple[int, int]:
    """(R, row length) of a validated adapter tensor: E [R] -> (R, 1), A [R, K] -> (R, K), B [N, R] -> (R, R)."""
    if kind == KIND_E:
        return p.shape[0], 1
    return (p.shape[0], p.shape[1]) if kind == KIND_A else (p.shape[1], p.shape[1])


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
    shapes = [_ranks_and_row_len(p, k) for p, k in zip(params, kinds)]
    flag = torch.zeros((), dtype=torch.bool, device=scores.device)
    with torch.cuda.device(scores.device):
        mod = cuda_module.require()
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
