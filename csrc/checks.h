// Argument and CUDA-status checks for the bindings (FlashAttention flash_api.cpp style). A failed check
// throws: std::invalid_argument becomes ValueError in Python, std::runtime_error becomes RuntimeError.
#pragma once

#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace lora_kernels {

template <typename... Parts>
std::string str_cat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

}  // namespace lora_kernels

// LK_CHECK(cond, message parts...): the parts should name the argument and its value.
#define LK_CHECK(cond, ...)                                                                          \
  do {                                                                                               \
    if (!(cond)) throw std::invalid_argument(::lora_kernels::str_cat("lora_kernels: ", __VA_ARGS__)); \
  } while (0)

#define LK_CHECK_NONNEG(name) LK_CHECK((name) >= 0, #name " must be >= 0, got ", (name))
#define LK_CHECK_PTR(name) LK_CHECK((name) != 0, #name " is a null device pointer")
#define LK_CHECK_DTYPE(name)                                                                  \
  LK_CHECK((name) == ::lora_kernels::kF32 || (name) == ::lora_kernels::kF16 ||                 \
               (name) == ::lora_kernels::kBF16,                                                \
           #name " must be a dtype code (0 = fp32, 1 = fp16, 2 = bf16), got ", (name))

// Raises RuntimeError naming the launcher and the CUDA error (also reports earlier asynchronous errors,
// which surface at the next launch).
#define LK_CHECK_CUDA(what, expr)                                                                      \
  do {                                                                                                 \
    const cudaError_t lk_err_ = (expr);                                                                \
    if (lk_err_ != cudaSuccess)                                                                        \
      throw std::runtime_error(::lora_kernels::str_cat("lora_kernels: ", what, " failed with CUDA error ", \
                                                       cudaGetErrorName(lk_err_), ": ",                \
                                                       cudaGetErrorString(lk_err_)));                  \
  } while (0)
