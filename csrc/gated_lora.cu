// Skinny gated LoRA kernels for decode-like shapes (T <= 64), Punica BGMV-style: a GEMM tile would be
// mostly padding at these T, so one warp owns one (token, rank) dot product (shrink) and one thread owns
// one output column for a small tile of tokens (expand). Everything accumulates in fp32.
#include "gated_lora.h"

#include "common.cuh"

namespace lora_kernels {
namespace {

constexpr int kShrinkWarps = 4;      // ranks per block: a token row of x is re-read by 4 warps via L1
constexpr int kExpandThreads = 128;  // output columns per block
constexpr int kExpandTokens = 4;     // tokens per block: each B element loaded once serves 4 tokens
constexpr int kExpandRChunk = 128;   // ranks staged in shared memory at a time (no limit on R)
constexpr int64_t kMaxGridYZ = 65535;

template <typename TIn, typename TM>
__global__ void __launch_bounds__(kShrinkWarps * 32) shrink_kernel(ShrinkArgs a, bool vec) {
  const int lane = threadIdx.x & 31;
  const int64_t t = blockIdx.x;
  const int64_t r = int64_t(blockIdx.y) * kShrinkWarps + (threadIdx.x >> 5);
  if (r >= a.R) return;  // whole warps leave; there is no block-level barrier below
  const TIn* in = static_cast<const TIn*>(a.in) + t * a.in_s0;
  const TM* m = static_cast<const TM*>(a.m) + r * a.m_s0;
  const bool drop = a.dropout.threshold != 0;
  const uint32_t rh = dropout_row_hash(a.dropout.seed, static_cast<uint32_t>(t));
  float acc = 0.f;
  int64_t d0 = 0;
  if (vec) {  // unit stride and 16-byte aligned rows (checked by the launcher)
    const int64_t d8 = a.D / 8 * 8;
    for (int64_t d = int64_t(lane) * 8; d < d8; d += 32 * 8) {
      float xv[8], mv[8];
      load8(in + d, xv);
      load8(m + d, mv);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const bool keep = !drop || dropout_keep(rh, static_cast<uint32_t>(d + j), a.dropout.threshold);
        acc += keep ? xv[j] * mv[j] : 0.f;
      }
    }
    d0 = d8;
  }
  for (int64_t d = d0 + lane; d < a.D; d += 32) {
    const bool keep = !drop || dropout_keep(rh, static_cast<uint32_t>(d), a.dropout.threshold);
    if (keep) acc += to_float(in[d * a.in_s1]) * to_float(m[d * a.m_s1]);
  }
  acc = warp_sum(acc);
  if (lane != 0) return;
  const float v = a.alpha * (drop ? acc * a.dropout.scale : acc);
  a.out[t * a.out_s0 + r] = v;
  if (a.hg != nullptr) {
    float g = 1.f;
    if (a.gate_kind == kGateRank) g = a.gate[r * a.gate_s1];
    if (a.gate_kind == kGateToken) g = a.gate[t * a.gate_s0 + r * a.gate_s1];
    a.hg[t * a.hg_s0 + r] = v * g;
  }
}

template <typename TY, typename TM>
__global__ void __launch_bounds__(kExpandThreads) expand_add_kernel(ExpandArgs a) {
  __shared__ float hs[kExpandTokens][kExpandRChunk];
  const int64_t n = int64_t(blockIdx.x) * kExpandThreads + threadIdx.x;
  const int64_t t0 = int64_t(blockIdx.y) * kExpandTokens;
  const TM* m = static_cast<const TM*>(a.m);
  float acc[kExpandTokens] = {};
  for (int64_t r0 = 0; r0 < a.R; r0 += kExpandRChunk) {
    for (int i = threadIdx.x; i < kExpandTokens * kExpandRChunk; i += kExpandThreads) {
      const int tt = i / kExpandRChunk, rr = i % kExpandRChunk;
      const int64_t t = t0 + tt, r = r0 + rr;
      hs[tt][rr] = (t < a.T && r < a.R) ? a.h[t * a.h_s0 + r * a.h_s1] : 0.f;
    }
    __syncthreads();
    if (n < a.N) {
      const int rend = static_cast<int>(a.R - r0 < kExpandRChunk ? a.R - r0 : kExpandRChunk);
      const TM* mrow = m + n * a.m_s0 + r0 * a.m_s1;
      for (int rr = 0; rr < rend; ++rr) {
        const float mv = to_float(mrow[rr * a.m_s1]);
#pragma unroll
        for (int tt = 0; tt < kExpandTokens; ++tt) acc[tt] += hs[tt][rr] * mv;
      }
    }
    __syncthreads();
  }
  if (n >= a.N) return;
  const bool drop = a.dropout.threshold != 0;
#pragma unroll
  for (int tt = 0; tt < kExpandTokens; ++tt) {
    const int64_t t = t0 + tt;
    if (t >= a.T) break;
    float v = a.alpha * acc[tt];
    if (drop) {
      const uint32_t rh = dropout_row_hash(a.dropout.seed, static_cast<uint32_t>(t));
      v = dropout_keep(rh, static_cast<uint32_t>(n), a.dropout.threshold) ? v * a.dropout.scale : 0.f;
    }
    TY* p = static_cast<TY*>(a.y) + t * a.y_s0 + n * a.y_s1;
    *p = from_float<TY>(to_float(*p) + v);
  }
}

bool aligned16(const void* p, int64_t row_stride, int64_t elem_size) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (row_stride * elem_size) % 16 == 0;
}

bool valid_dtype(int code) { return code == kF32 || code == kF16 || code == kBF16; }

// Instantiates KERNEL<TA, TB> for the runtime dtype pair: 9 instantiations per kernel, no more.
template <template <typename, typename> class Launch, typename... Args>
cudaError_t dispatch2(int da, int db, Args&&... args) {
  auto inner = [&](auto a_tag) -> cudaError_t {
    using TA = decltype(a_tag);
    switch (db) {
      case kF32: return Launch<TA, float>::run(args...);
      case kF16: return Launch<TA, __half>::run(args...);
      case kBF16: return Launch<TA, __nv_bfloat16>::run(args...);
      default: return cudaErrorInvalidValue;
    }
  };
  switch (da) {
    case kF32: return inner(float{});
    case kF16: return inner(__half{});
    case kBF16: return inner(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename TIn, typename TM>
struct ShrinkLaunch {
  static cudaError_t run(const ShrinkArgs& a, cudaStream_t stream) {
    const bool vec = a.in_s1 == 1 && a.m_s1 == 1 && aligned16(a.in, a.in_s0, sizeof(TIn)) &&
                     aligned16(a.m, a.m_s0, sizeof(TM));
    const dim3 grid(static_cast<unsigned>(a.T), static_cast<unsigned>((a.R + kShrinkWarps - 1) / kShrinkWarps));
    shrink_kernel<TIn, TM><<<grid, kShrinkWarps * 32, 0, stream>>>(a, vec);
    return cudaGetLastError();
  }
};

template <typename TY, typename TM>
struct ExpandLaunch {
  static cudaError_t run(const ExpandArgs& a, cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>((a.N + kExpandThreads - 1) / kExpandThreads),
                    static_cast<unsigned>((a.T + kExpandTokens - 1) / kExpandTokens));
    expand_add_kernel<TY, TM><<<grid, kExpandThreads, 0, stream>>>(a);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t launch_shrink(const ShrinkArgs& a, cudaStream_t stream) {
  if (a.T < 0 || a.D < 0 || a.R < 0) return cudaErrorInvalidValue;
  if (!valid_dtype(a.in_dtype) || !valid_dtype(a.m_dtype)) return cudaErrorInvalidValue;
  if (a.T > INT32_MAX || (a.R + kShrinkWarps - 1) / kShrinkWarps > kMaxGridYZ) return cudaErrorInvalidValue;
  if (a.gate_kind < kGateNone || a.gate_kind > kGateToken || (a.gate_kind != kGateNone && a.gate == nullptr)) return cudaErrorInvalidValue;
  if (a.dropout.threshold > (1u << 24)) return cudaErrorInvalidValue;
  if (a.T == 0 || a.R == 0) return cudaSuccess;
  if (a.out == nullptr || (a.D > 0 && (a.in == nullptr || a.m == nullptr))) return cudaErrorInvalidValue;
  return dispatch2<ShrinkLaunch>(a.in_dtype, a.m_dtype, a, stream);
}

cudaError_t launch_expand_add(const ExpandArgs& a, cudaStream_t stream) {
  if (a.T < 0 || a.N < 0 || a.R < 0) return cudaErrorInvalidValue;
  if (!valid_dtype(a.y_dtype) || !valid_dtype(a.m_dtype)) return cudaErrorInvalidValue;
  if ((a.N + kExpandThreads - 1) / kExpandThreads > INT32_MAX ||
      (a.T + kExpandTokens - 1) / kExpandTokens > kMaxGridYZ)
    return cudaErrorInvalidValue;
  if (a.dropout.threshold > (1u << 24)) return cudaErrorInvalidValue;
  if (a.T == 0 || a.N == 0 || a.R == 0) return cudaSuccess;  // adding an empty sum leaves y as it is
  if (a.y == nullptr || a.h == nullptr || a.m == nullptr) return cudaErrorInvalidValue;
  return dispatch2<ExpandLaunch>(a.y_dtype, a.m_dtype, a, stream);
}

}  // namespace lora_kernels
