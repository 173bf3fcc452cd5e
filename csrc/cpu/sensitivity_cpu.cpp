// One pass per element instead of the ~10 memory passes of the torch reference (PERFORMANCE.md): the
// update is memory-bound, so reading w, g, ipt, unc once and writing ipt, unc once is the whole game.
#include "sensitivity_cpu.h"

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lora_kernels {
namespace cpu {
namespace {

struct Entry {
  const void* p;
  const void* g;
  float* ipt;
  float* unc;
  int64_t numel, row_len, score_offset;
  int kind, dtype;
};

Entry entry(const int64_t* table, int64_t j) {
  const int64_t* r = table + j * kSensCpuTableCols;
  return {reinterpret_cast<const void*>(r[kColParam]), reinterpret_cast<const void*>(r[kColGrad]),
          reinterpret_cast<float*>(r[kColIpt]), reinterpret_cast<float*>(r[kColUnc]), r[kColNumel],
          r[kColRowLen], r[kColScoreOffset], static_cast<int>(r[kColKind]),
          static_cast<int>(r[kColDtype])};
}

// Loaders: plain bit arithmetic so the baseline x86-64 build vectorises them (no F16C needed).
struct F32 {
  using T = float;
  static float load(float v) { return v; }
  static bool nonfinite(uint32_t bits) { return (bits & 0x7f800000u) == 0x7f800000u; }
};
struct BF16 {
  using T = uint16_t;
  static float load(uint16_t v) {
    const uint32_t b = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
  }
  static bool nonfinite(uint16_t bits) { return (bits & 0x7f80u) == 0x7f80u; }
};
struct F16 {
  using T = uint16_t;
  // Exact half -> float (F. Giesen's magic-number method): rebias the exponent, fix Inf/NaN and subnormals.
  static float load(uint16_t h) {
    const uint32_t shifted_exp = 0x7c00u << 13;
    uint32_t o = (uint32_t(h) & 0x7fffu) << 13;
    const uint32_t exp = shifted_exp & o;
    o += (127u - 15u) << 23;
    float f;
    if (exp == shifted_exp) {
      o += (128u - 16u) << 23;
      std::memcpy(&f, &o, 4);
    } else if (exp == 0) {
      o += 1u << 23;
      std::memcpy(&f, &o, 4);
      f -= 6.103515625e-05f;  // 2^-14: the magic subtraction renormalises a subnormal
    } else {
      std::memcpy(&f, &o, 4);
    }
    const uint32_t sign = (uint32_t(h) & 0x8000u) << 16;
    uint32_t b;
    std::memcpy(&b, &f, 4);
    b |= sign;
    std::memcpy(&f, &b, 4);
    return f;
  }
  static bool nonfinite(uint16_t bits) { return (bits & 0x7c00u) == 0x7c00u; }
};

template <class D>
bool any_nonfinite(const void* g, int64_t n) {
  using Bits = std::conditional_t<sizeof(typename D::T) == 4, uint32_t, uint16_t>;
  const Bits* b = static_cast<const Bits*>(g);
  // OR over a branch-free predicate so the compiler vectorises the scan; exit per 4096-block.
  for (int64_t i0 = 0; i0 < n; i0 += 4096) {
    const int64_t i1 = n < i0 + 4096 ? n : i0 + 4096;
    unsigned bad = 0;
    for (int64_t i = i0; i < i1; ++i) bad |= unsigned(D::nonfinite(b[i]));
    if (bad) return true;
  }
  return false;
}

bool tensor_nonfinite(const Entry& e, const void* data) {
  switch (e.dtype) {
    case kF16: return any_nonfinite<F16>(data, e.numel);
    case kBF16: return any_nonfinite<BF16>(data, e.numel);
    default: return any_nonfinite<F32>(data, e.numel);
  }
}

// Updates ipt/unc over [i0, i1) and returns the sum of ipt * unc over it. Eight independent double
// lanes keep the sum in a fixed order (the compiler may vectorise them without reassociation).
template <class D>
double update_span(const typename D::T* __restrict p, const typename D::T* __restrict g, float* __restrict ipt,
                   float* __restrict unc, int64_t i0, int64_t i1, float b1, float b2) {
  const float c1 = 1.f - b1, c2 = 1.f - b2;
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    for (int l = 0; l < 8; ++l) {
      const float imp = std::fabs(D::load(p[i + l]) * D::load(g[i + l]));
      const float a = b1 * ipt[i + l] + c1 * imp;
      const float u = b2 * unc[i + l] + c2 * std::fabs(imp - a);
      ipt[i + l] = a;
      unc[i + l] = u;
      lane[l] += double(a * u);
    }
  }
  double tail = 0;
  for (; i < i1; ++i) {
    const float imp = std::fabs(D::load(p[i]) * D::load(g[i]));
    const float a = b1 * ipt[i] + c1 * imp;
    const float u = b2 * unc[i] + c2 * std::fabs(imp - a);
    ipt[i] = a;
    unc[i] = u;
    tail += double(a * u);
  }
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])) + tail;
}

// B [N, R]: column sums; the row of R accumulators is updated in place row by row (vectorises over r).
template <class D>
void update_cols(const typename D::T* __restrict p, const typename D::T* __restrict g, float* __restrict ipt,
                 float* __restrict unc, int64_t N, int64_t R, float b1, float b2, double* __restrict acc) {
  const float c1 = 1.f - b1, c2 = 1.f - b2;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t base = n * R;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = base + r;
      const float imp = std::fabs(D::load(p[i]) * D::load(g[i]));
      const float a = b1 * ipt[i] + c1 * imp;
      const float u = b2 * unc[i] + c2 * std::fabs(imp - a);
      ipt[i] = a;
      unc[i] = u;
      acc[r] += double(a * u);
    }
  }
}

// One tensor: writes its R per-rank contributions (already divided by K or N) into out[0..R).
template <class D>
void update_tensor(const Entry& e, float b1, float b2, double* out) {
  using T = typename D::T;
  const T* p = static_cast<const T*>(e.p);
  const T* g = static_cast<const T*>(e.g);
  if (e.kind == kKindE) {  // E [R]: every element is a rank
    const float c1 = 1.f - b1, c2 = 1.f - b2;
    for (int64_t i = 0; i < e.numel; ++i) {
      const float imp = std::fabs(D::load(p[i]) * D::load(g[i]));
      const float a = b1 * e.ipt[i] + c1 * imp;
      const float u = b2 * e.unc[i] + c2 * std::fabs(imp - a);
      e.ipt[i] = a;
      e.unc[i] = u;
      out[i] = double(a * u);
    }
  } else if (e.kind == kKindA) {  // A [R, K]: row means
    const int64_t K = e.row_len, R = e.numel / K;
    for (int64_t r = 0; r < R; ++r) out[r] = update_span<D>(p, g, e.ipt, e.unc, r * K, (r + 1) * K, b1, b2) / double(K);
  } else {  // B [N, R]: column means
    const int64_t R = e.row_len, N = e.numel / R;
    for (int64_t r = 0; r < R; ++r) out[r] = 0;
    update_cols<D>(p, g, e.ipt, e.unc, N, R, b1, b2, out);
    for (int64_t r = 0; r < R; ++r) out[r] /= double(N);
  }
}

void dispatch_tensor(const Entry& e, float b1, float b2, double* out) {
  switch (e.dtype) {
    case kF16: update_tensor<F16>(e, b1, b2, out); break;
    case kBF16: update_tensor<BF16>(e, b1, b2, out); break;
    default: update_tensor<F32>(e, b1, b2, out); break;
  }
}

int64_t ranks_of(const Entry& e) {
  if (e.numel == 0) return 0;
  return e.kind == kKindE ? e.numel : (e.kind == kKindA ? e.numel / e.row_len : e.row_len);
}

}  // namespace

int sensitivity_update_cpu_checked(const int64_t* table, int64_t n_tensors, float* scores, float beta1, float beta2,
                                   int n_threads, bool check_params) {
  if (n_tensors <= 0) return kSensOk;
  std::vector<Entry> es(static_cast<size_t>(n_tensors));
  std::vector<int64_t> part_off(static_cast<size_t>(n_tensors) + 1, 0);
  for (int64_t j = 0; j < n_tensors; ++j) {
    es[j] = entry(table, j);
    part_off[j + 1] = part_off[j] + ranks_of(es[j]);
  }
  // The whole check runs before any write: a skipped step must leave every state untouched. Weights first
  // (their code wins when both are bad), each scan stopping at its first hit.
  bool bad_p = false, bad_g = false;
  if (check_params) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1) reduction(|| : bad_p) if (n_threads > 1)
#endif
    for (int64_t j = 0; j < n_tensors; ++j) {
      if (!bad_p && es[j].numel > 0) bad_p = tensor_nonfinite(es[j], es[j].p);
    }
    if (bad_p) return kSensBadParam;
  }
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1) reduction(|| : bad_g) if (n_threads > 1)
#endif
  for (int64_t j = 0; j < n_tensors; ++j) {
    if (!bad_g && es[j].numel > 0) bad_g = tensor_nonfinite(es[j], es[j].g);
  }
  if (bad_g) return kSensBadGrad;
  std::vector<double> part(static_cast<size_t>(part_off[n_tensors]));
  // One tensor per task; each writes only its own slice of `part`, so threads never share an accumulator.
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1) if (n_threads > 1)
#endif
  for (int64_t j = 0; j < n_tensors; ++j) {
    if (es[j].numel > 0) dispatch_tensor(es[j], beta1, beta2, part.data() + part_off[j]);
  }
  // Table order, single thread: tensors that share ranks (λ, A, B of one module; a shared A) add in a fixed order.
  for (int64_t j = 0; j < n_tensors; ++j) {
    const double* src = part.data() + part_off[j];
    float* dst = scores + es[j].score_offset;
    for (int64_t r = 0, R = part_off[j + 1] - part_off[j]; r < R; ++r) dst[r] += float(src[r]);
  }
  return kSensOk;
}

bool sensitivity_update_cpu(const int64_t* table, int64_t n_tensors, float* scores, float beta1, float beta2,
                            int n_threads) {
  return sensitivity_update_cpu_checked(table, n_tensors, scores, beta1, beta2, n_threads, false) != kSensOk;
}

}  // namespace cpu
}  // namespace lora_kernels
