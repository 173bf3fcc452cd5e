// Host-and-device definitions shared by the kernels and the bindings: dtype codes and the dropout hash
// (host-callable so the bindings can expose it and a CPU test can compare it with the reference).
#pragma once

#include <cstdint>

#include "codes.h"

#ifdef __CUDACC__
#define LK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LK_HOST_DEVICE inline
#endif

namespace lora_kernels {

// The numbers come from lora_kernels/codes.py through the generated codes.h, never typed twice.
enum DType : int { kF32 = codes::kDTypeF32, kF16 = codes::kDTypeF16, kBF16 = codes::kDTypeBF16 };
// The gated op's gate: none, per-rank [R], per-token [T, R].
enum GateKind : int { kGateNone = codes::kGateNone, kGateRank = codes::kGateRank, kGateToken = codes::kGateToken };
// Adapter tensor kinds of the sensitivity table: E [R], A [R, K], B [N, R].
enum SensKind : int { kKindE = codes::kKindE, kKindA = codes::kKindA, kKindB = codes::kKindB };

// The dropout keep test of lora_kernels/reference.py::dropout_keep, bit for bit: murmur3 fmix32 of the
// seeded row, xor the scrambled column, fmix32 again; keep iff the top 24 bits >= round(p * 2^24).
LK_HOST_DEVICE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}
LK_HOST_DEVICE uint32_t dropout_row_hash(uint32_t seed, uint32_t row) { return fmix32(seed + row * 0x9E3779B9u); }
LK_HOST_DEVICE bool dropout_keep(uint32_t row_hash, uint32_t col, uint32_t threshold) {
  return (fmix32(row_hash ^ (col * 0x85EBCA6Bu)) >> 8) >= threshold;
}

// The dtype codes as attributes of a pybind11 module (both compiled modules export them).
template <typename Module>
inline void export_dtype_codes(Module& mod) {
  mod.attr("DTYPE_F32") = static_cast<int>(kF32);
  mod.attr("DTYPE_F16") = static_cast<int>(kF16);
  mod.attr("DTYPE_BF16") = static_cast<int>(kBF16);
}

}  // namespace lora_kernels
