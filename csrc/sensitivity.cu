// Multi-tensor sensitivity update: one launch for every adapter tensor of a model instead of a Python
// loop of ~12 memory passes per parameter (PERFORMANCE.md). Block b finds its tensor by binary search in
// the chunk prefix column of the table, so any mix of tensor sizes needs one grid.
#include "sensitivity.h"

#include "common.cuh"

namespace lora_kernels {
namespace {

constexpr int kSensThreads = 256;

struct Entry {
  const void* p;
  const void* g;
  float* ipt;
  float* unc;
  int64_t numel, row_len, score_offset, begin;
  int kind, dtype;
};

__device__ Entry find_entry(const int64_t* table, int64_t n, int64_t block) {
  int64_t lo = 0, hi = n - 1;  // last row whose chunk_begin <= block (empty tensors share a begin)
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (table[mid * kSensTableCols + kColChunkBegin] <= block) lo = mid; else hi = mid - 1;
  }
  const int64_t* row = table + lo * kSensTableCols;
  Entry e;
  e.p = reinterpret_cast<const void*>(row[kColParam]);
  e.g = reinterpret_cast<const void*>(row[kColGrad]);
  e.ipt = reinterpret_cast<float*>(row[kColIpt]);
  e.unc = reinterpret_cast<float*>(row[kColUnc]);
  e.numel = row[kColNumel];
  e.kind = static_cast<int>(row[kColKind]);
  e.dtype = static_cast<int>(row[kColDtype]);
  e.row_len = row[kColRowLen];
  e.score_offset = row[kColScoreOffset];
  e.begin = row[kColChunkBegin];
  return e;
}

__device__ __forceinline__ float load_as_float(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case kF16: return to_float(static_cast<const __half*>(base)[i]);
    case kBF16: return to_float(static_cast<const __nv_bfloat16*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

__global__ void __launch_bounds__(kSensThreads) nonfinite_kernel(SensitivityArgs a) {
  const Entry e = find_entry(a.table, a.n_tensors, blockIdx.x);
  const int64_t e0 = (int64_t(blockIdx.x) - e.begin) * kSensChunk;
  const int64_t e1 = min(e.numel, e0 + kSensChunk);
  bool bad = false;
  for (int64_t i = e0 + threadIdx.x; i < e1; i += kSensThreads) bad |= !isfinite(load_as_float(e.g, e.dtype, i));
  if (bad) *a.nonfinite = 1;  // every writer stores the same value: a benign race, no atomic needed
}

__global__ void __launch_bounds__(kSensThreads) update_kernel(SensitivityArgs a) {
  // Same stream as the check kernel, so its result is visible here.
  if (*reinterpret_cast<volatile uint8_t*>(a.nonfinite)) return;
  // Per-rank partial sums of this chunk: a chunk covers at most kSensChunk ranks for every kind
  // (E: one per element; A: (chunk-1)/K + 2; B: R, or global atomics when R > kSensChunk).
  __shared__ float part[kSensChunk];
  const Entry e = find_entry(a.table, a.n_tensors, blockIdx.x);
  const int64_t e0 = (int64_t(blockIdx.x) - e.begin) * kSensChunk;
  const int64_t e1 = min(e.numel, e0 + kSensChunk);
  for (int i = threadIdx.x; i < kSensChunk; i += kSensThreads) part[i] = 0.f;
  __syncthreads();

  const int64_t rank0 = e.kind == kKindA ? e0 / e.row_len : (e.kind == kKindE ? e0 : 0);
  const bool shared_ok = e.kind != kKindB || e.row_len <= kSensChunk;
  const float w = e.kind == kKindA ? 1.f / float(e.row_len)
                : e.kind == kKindB ? 1.f / float(e.numel / e.row_len) : 1.f;
  const float b1 = a.beta1, b2 = a.beta2;
  // A thread's consecutive elements are kSensThreads apart and often share a rank (A with K >= 256,
  // B with R dividing 256): keep a running sum and flush only when the rank changes.
  int64_t cur = -1;
  float run = 0.f;
  auto flush = [&]() {
    if (cur < 0) return;
    if (shared_ok) atomicAdd(&part[cur - rank0], run);
    else atomicAdd(&a.scores[e.score_offset + cur], run);
  };
  for (int64_t i = e0 + threadIdx.x; i < e1; i += kSensThreads) {
    const float imp = fabsf(load_as_float(e.p, e.dtype, i) * load_as_float(e.g, e.dtype, i));
    const float ipt = b1 * e.ipt[i] + (1.f - b1) * imp;
    const float unc = b2 * e.unc[i] + (1.f - b2) * fabsf(imp - ipt);
    e.ipt[i] = ipt;
    e.unc[i] = unc;
    const int64_t rank = e.kind == kKindE ? i : (e.kind == kKindA ? i / e.row_len : i % e.row_len);
    if (rank != cur) {
      flush();
      cur = rank;
      run = 0.f;
    }
    run += ipt * unc * w;
  }
  flush();
  if (!shared_ok) return;  // uniform per block: no thread is left waiting at the barrier
  __syncthreads();
  const int64_t nranks = e.kind == kKindB ? e.row_len : (e.kind == kKindA ? (e1 - 1) / e.row_len - rank0 + 1 : e1 - e0);
  for (int64_t s = threadIdx.x; s < nranks && s < kSensChunk; s += kSensThreads) {
    const float v = part[s];
    if (v != 0.f) atomicAdd(&a.scores[e.score_offset + rank0 + s], v);
  }
}

}  // namespace

cudaError_t launch_sensitivity_update(const SensitivityArgs& a, cudaStream_t stream) {
  if (a.n_tensors < 0 || a.total_chunks < 0 || a.total_chunks > INT32_MAX) return cudaErrorInvalidValue;
  if (a.n_tensors == 0 || a.total_chunks == 0) return cudaSuccess;
  if (a.table == nullptr || a.scores == nullptr || a.nonfinite == nullptr) return cudaErrorInvalidValue;
  const unsigned grid = static_cast<unsigned>(a.total_chunks);
  nonfinite_kernel<<<grid, kSensThreads, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  update_kernel<<<grid, kSensThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace lora_kernels
