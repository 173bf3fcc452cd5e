// C-style launchers of the skinny gated LoRA kernels (decode-like T <= 64, Punica BGMV-style).
// All strides are in elements; pointers are device pointers; nothing here touches torch.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace lora_kernels {

// Dropout regenerated from a seed on the (row, col) grid of the dropped tensor. threshold == 0: off.
struct DropoutArgs {
  uint32_t seed = 0;
  uint32_t threshold = 0;  // round(p * 2^24)
  float scale = 1.f;       // 1 / (1 - p)
};

// out[t, r] = alpha * sum_d dropout(in)[t, d] * m[r, d]          (fp32 out)
// hg[t, r]  = out[t, r] * gate                                    (optional, fp32)
// gate_kind: 0 none, 1 per-rank gate[r * gate_s1], 2 per-token gate[t * gate_s0 + r * gate_s1] (fp32).
// Forward: in = x, m = A.  Backward dZ: in = dy, m = B^T through strides (m_s0 = B.stride(1)).
struct ShrinkArgs {
  const void* in; int in_dtype; int64_t in_s0, in_s1;
  const void* m; int m_dtype; int64_t m_s0, m_s1;
  float* out; int64_t out_s0;
  float* hg; int64_t hg_s0;              // may be null
  const float* gate; int gate_kind; int64_t gate_s0, gate_s1;
  int64_t T, D, R;
  float alpha;
  DropoutArgs dropout;
};

// y[t, n] += alpha * keep(t, n) * scale * sum_r h[t, r] * m[n, r]   (read-modify-write, y in its dtype)
// Forward: y = x W^T + b from cuBLAS, h = H*G, m = B.  Backward dx: y = dy W, h = dH, m = A^T by strides.
struct ExpandArgs {
  void* y; int y_dtype; int64_t y_s0, y_s1;
  const float* h; int64_t h_s0, h_s1;
  const void* m; int m_dtype; int64_t m_s0, m_s1;
  int64_t T, N, R;
  float alpha;
  DropoutArgs dropout;  // applied on the output grid (t, n)
};

// Both return cudaErrorInvalidValue for arguments they cannot run (the bindings check first, with
// messages), otherwise the launch status. T == 0 or an empty output launches nothing.
cudaError_t launch_shrink(const ShrinkArgs& a, cudaStream_t stream);
cudaError_t launch_expand_add(const ExpandArgs& a, cudaStream_t stream);

}  // namespace lora_kernels
