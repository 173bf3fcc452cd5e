// The int64 table that describes adapter tensors to the sensitivity loops (ALGORITHMS.md §2): one row per
// tensor, columns in this order. Plain C++ (no CUDA headers): the CUDA kernel and the CPU loop both read it.
#pragma once

namespace lora_kernels {

enum SensCol : int {
  kColParam = 0,    // pointer to w (fp32/fp16/bf16), contiguous
  kColGrad,         // pointer to g (same dtype and shape as w), contiguous
  kColIpt,          // pointer to the fp32 EMA of I = |w g|, updated in place
  kColUnc,          // pointer to the fp32 EMA of |I - ipt|, updated in place
  kColNumel,
  kColKind,         // 0 = E [R] singular values, 1 = A [R, K], 2 = B [N, R]
  kColDtype,        // DType code (common_types.h) of w and g
  kColRowLen,       // 1 for E, K for A, R for B
  kColScoreOffset,  // where this adapter's ranks start in scores
  kColChunkBegin,   // CUDA only: first block of this tensor (prefix sum of ceil(numel / kSensChunk))
};
constexpr int kSensCpuTableCols = kColChunkBegin;   // the CPU loop's rows stop before the chunk column
constexpr int kSensTableCols = kColChunkBegin + 1;  // the CUDA kernel's rows

}  // namespace lora_kernels
