// C-style launcher of the multi-tensor AdaLoRA sensitivity update (ALGORITHMS.md §2).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace lora_kernels {

// One row of int64 per adapter tensor, kSensTableCols columns in this order (the Python wrapper builds it):
enum SensCol : int {
  kColParam = 0,   // device pointer to w (fp32/fp16/bf16), contiguous
  kColGrad,        // device pointer to g (same dtype and shape as w), contiguous
  kColIpt,         // device pointer to the fp32 EMA of I = |w g|, updated in place
  kColUnc,         // device pointer to the fp32 EMA of |I - ipt|, updated in place
  kColNumel,
  kColKind,        // 0 = E [R] singular values, 1 = A [R, K], 2 = B [N, R]
  kColDtype,       // DType code of w and g
  kColRowLen,      // 1 for E, K for A, R for B
  kColScoreOffset, // where this adapter's ranks start in scores
  kColChunkBegin,  // first block of this tensor (prefix sum of ceil(numel / kSensChunk))
  kSensTableCols
};
constexpr int kSensChunk = 4096;  // elements per block

struct SensitivityArgs {
  const int64_t* table;  // device [n_tensors, kSensTableCols]
  int64_t n_tensors;
  int64_t total_chunks;  // sum of every tensor's chunk count: the grid size
  float* scores;         // device fp32, accumulated into
  uint8_t* nonfinite;    // device bool, must be false on entry; set to true if any gradient is NaN/Inf
  float beta1, beta2;
};

// Launches the non-finite check over every gradient, then the update (which returns at once when the
// check found one), both on `stream`. The score reduction uses fp32 atomics: the last bits of a score
// depend on the order blocks finish in (not deterministic); the EMA states are deterministic.
cudaError_t launch_sensitivity_update(const SensitivityArgs& a, cudaStream_t stream);

}  // namespace lora_kernels
