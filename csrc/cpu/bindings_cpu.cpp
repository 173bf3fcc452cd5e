// Binding of the CPU module: Python passes host pointers (tensor.data_ptr()) as integers, like the CUDA
// module, so this builds with gcc and pybind11 alone (no torch headers, no nvcc).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>

#include "sensitivity_cpu.h"

namespace py = pybind11;
using namespace lora_kernels;
using namespace lora_kernels::cpu;

namespace {

// checks.h pulls in cuda_runtime.h; this module must build without the toolkit. ValueError in Python.
template <typename... Parts>
void check(bool cond, const Parts&... parts) {
  if (cond) return;
  std::ostringstream os;
  os << "lora_kernels: ";
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

int sensitivity_update_checked(uintptr_t table_ptr, int64_t n_tensors, uintptr_t scores_ptr, int64_t n_scores,
                               float beta1, float beta2, int n_threads, bool check_params) {
  check(n_tensors >= 0, "n_tensors must be >= 0, got ", n_tensors);
  check(beta1 >= 0.f && beta1 < 1.f, "beta1 must be in [0, 1), got ", beta1);
  check(beta2 >= 0.f && beta2 < 1.f, "beta2 must be in [0, 1), got ", beta2);
  check(n_threads >= 1, "n_threads must be >= 1, got ", n_threads);
  if (n_tensors == 0) return kSensOk;
  check(table_ptr != 0, "table_ptr is a null pointer");
  check(scores_ptr != 0, "scores_ptr is a null pointer");
  const int64_t* table = reinterpret_cast<const int64_t*>(table_ptr);
  // Cheap structural checks on every row (the Python wrapper validated the tensors themselves).
  for (int64_t j = 0; j < n_tensors; ++j) {
    const int64_t* r = table + j * kSensCpuTableCols;
    const int64_t numel = r[kColNumel], kind = r[kColKind], dtype = r[kColDtype], len = r[kColRowLen];
    check(kind >= 0 && kind <= 2, "table row ", j, ": kind must be 0, 1 or 2, got ", kind);
    check(dtype >= 0 && dtype <= 2, "table row ", j, ": dtype must be 0 (fp32), 1 (fp16) or 2 (bf16), got ", dtype);
    check(numel >= 0, "table row ", j, ": numel must be >= 0, got ", numel);
    if (numel == 0) continue;
    check(len >= 1 && numel % len == 0, "table row ", j, ": row_len ", len, " must divide numel ", numel);
    check(kind != 0 || len == 1, "table row ", j, ": kind 0 (E) needs row_len 1, got ", len);
    const int64_t ranks = kind == 0 ? numel : (kind == 1 ? numel / len : len);
    check(r[kColScoreOffset] >= 0 && r[kColScoreOffset] + ranks <= n_scores, "table row ", j,
          ": score_offset ", r[kColScoreOffset], " + ", ranks, " ranks exceeds n_scores ", n_scores);
    for (int c = kColParam; c <= kColUnc; ++c) check(r[c] != 0, "table row ", j, ": column ", c, " is null");
  }
  py::gil_scoped_release no_gil;
  return sensitivity_update_cpu_checked(table, n_tensors, reinterpret_cast<float*>(scores_ptr), beta1, beta2,
                                        n_threads, check_params);
}

bool sensitivity_update(uintptr_t table_ptr, int64_t n_tensors, uintptr_t scores_ptr, int64_t n_scores, float beta1,
                        float beta2, int n_threads) {
  return sensitivity_update_checked(table_ptr, n_tensors, scores_ptr, n_scores, beta1, beta2, n_threads, false) !=
         kSensOk;
}

}  // namespace

PYBIND11_MODULE(_lora_kernels_cpu, mod) {
  mod.doc() = "lora-kernels CPU loops (host pointers as ints; no torch, no CUDA)";
  export_dtype_codes(mod);
  mod.attr("SENS_TABLE_COLS") = static_cast<int>(kSensCpuTableCols);
#ifdef _OPENMP
  mod.attr("OPENMP") = true;
#else
  mod.attr("OPENMP") = false;
#endif
  mod.attr("LAUNCHERS") = py::make_tuple("sensitivity_update", "sensitivity_update_checked");
  mod.def("sensitivity_update", &sensitivity_update,
          "non-finite check of every gradient (True: nothing written), then one fused EMA/score pass; "
          "table: int64 [n_tensors, SENS_TABLE_COLS]",
          py::arg("table_ptr"), py::arg("n_tensors"), py::arg("scores_ptr"), py::arg("n_scores"), py::arg("beta1"),
          py::arg("beta2"), py::arg("n_threads") = 1);
  mod.def("sensitivity_update_checked", &sensitivity_update_checked,
          "sensitivity_update returning 0 (updated), 1 (a gradient is NaN/Inf) or 2 (a weight is NaN/Inf: scanned "
          "first when check_params); nothing written unless 0",
          py::arg("table_ptr"), py::arg("n_tensors"), py::arg("scores_ptr"), py::arg("n_scores"), py::arg("beta1"),
          py::arg("beta2"), py::arg("n_threads") = 1, py::arg("check_params") = true);
  mod.attr("SENS_OK") = kSensOk;
  mod.attr("SENS_BAD_GRAD") = kSensBadGrad;
  mod.attr("SENS_BAD_PARAM") = kSensBadParam;
}
