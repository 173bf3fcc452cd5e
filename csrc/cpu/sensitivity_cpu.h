// Host-only multi-tensor AdaLoRA sensitivity update (ALGORITHMS.md §2): the CPU twin of sensitivity.cu,
// with no CUDA or torch headers so it builds wherever gcc does.
#pragma once

#include <cstdint>

#include "../common_types.h"
#include "../sensitivity_table.h"

namespace lora_kernels {
namespace cpu {

// Rows of the table: csrc/sensitivity_table.h (kSensCpuTableCols columns); dtype codes: common_types.h.

// Returns true (and writes nothing) when some gradient holds NaN/Inf. Otherwise updates every tensor's
// ipt/unc in one pass over w, g, ipt, unc and ADDS each tensor's per-rank score (E: s_i, A: row mean,
// B: column mean of s = ipt * unc) into scores. Per-rank sums are accumulated in double per tensor and
// added to scores in table order, so the result does not depend on n_threads.
bool sensitivity_update_cpu(const int64_t* table, int64_t n_tensors, float* scores, float beta1, float beta2,
                            int n_threads);

// Return codes of sensitivity_update_cpu_checked.
constexpr int kSensOk = 0, kSensBadGrad = 1, kSensBadParam = 2;

// The same update; with check_params the weights are scanned for NaN/Inf too (before the gradients, in the same
// pre-pass), so a non-finite weight skips the step without a separate pass in Python. Returns kSensOk,
// kSensBadParam (some weight non-finite; checked first) or kSensBadGrad; nothing is written unless kSensOk.
int sensitivity_update_cpu_checked(const int64_t* table, int64_t n_tensors, float* scores, float beta1, float beta2,
                                   int n_threads, bool check_params);

}  // namespace cpu
}  // namespace lora_kernels
