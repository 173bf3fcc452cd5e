// Host-only multi-tensor AdaLoRA sensitivity update (ALGORITHMS.md §2): the CPU twin of sensitivity.cu,
// with no CUDA or torch headers so it builds wherever gcc does.
#pragma once

#include <cstdint>

namespace lora_kernels {
namespace cpu {

// Same dtype codes as common_types.h (DType) and the module attributes DTYPE_F32/F16/BF16.
enum CpuDType : int { kCpuF32 = 0, kCpuF16 = 1, kCpuBF16 = 2 };

// One row of int64 per adapter tensor, kCpuSensCols columns in this order (the Python wrapper builds it):
enum CpuSensCol : int {
  kCpuColParam = 0,    // host pointer to w (fp32/fp16/bf16), contiguous
  kCpuColGrad,         // host pointer to g (same dtype and numel as w), contiguous
  kCpuColIpt,          // host pointer to the fp32 EMA of I = |w g|, updated in place
  kCpuColUnc,          // host pointer to the fp32 EMA of |I - ipt|, updated in place
  kCpuColNumel,
  kCpuColKind,         // 0 = E [R], 1 = A [R, K], 2 = B [N, R]
  kCpuColDtype,        // CpuDType of w and g
  kCpuColRowLen,       // 1 for E, K for A, R for B
  kCpuColScoreOffset,  // where this adapter's ranks start in scores
  kCpuSensCols
};

// Returns true (and writes nothing) when some gradient holds NaN/Inf. Otherwise updates every tensor's
// ipt/unc in one pass over w, g, ipt, unc and ADDS each tensor's per-rank score (E: s_i, A: row mean,
// B: column mean of s = ipt * unc) into scores. Per-rank sums are accumulated in double per tensor and
// added to scores in table order, so the result does not depend on n_threads.
bool sensitivity_update_cpu(const int64_t* table, int64_t n_tensors, float* scores, float beta1, float beta2,
                            int n_threads);

}  // namespace cpu
}  // namespace lora_kernels
