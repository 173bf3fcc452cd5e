// C-style launcher of the multi-tensor AdaLoRA sensitivity update (ALGORITHMS.md §2).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "sensitivity_table.h"

namespace lora_kernels {

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
