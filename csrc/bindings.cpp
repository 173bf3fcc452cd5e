// The one binding file: Python passes raw device pointers (tensor.data_ptr()), element strides and the
// stream (torch.cuda.current_stream().cuda_stream) as integers. This keeps the module independent of
// torch's C++ ABI (the CPU torch wheel cannot build a CUDAExtension). Importing it makes no CUDA call.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "checks.h"
#include "common_types.h"
#include "gated_lora.h"
#include "sensitivity.h"

namespace py = pybind11;
using namespace lora_kernels;

namespace {

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

DropoutArgs dropout_args(uint32_t seed, uint32_t threshold, float scale) {
  LK_CHECK(threshold <= (1u << 24), "dropout_threshold must be round(p * 2^24) <= 2^24, got ", threshold);
  LK_CHECK(threshold == 0 || scale > 0.f, "dropout_scale must be 1 / (1 - p) > 0, got ", scale);
  DropoutArgs d;
  d.seed = seed;
  d.threshold = threshold;
  d.scale = threshold == 0 ? 1.f : scale;
  return d;
}

void shrink(uintptr_t in_ptr, int in_dtype, int64_t in_s0, int64_t in_s1, uintptr_t m_ptr, int m_dtype, int64_t m_s0,
            int64_t m_s1, uintptr_t out_ptr, int64_t out_s0, uintptr_t hg_ptr, int64_t hg_s0, uintptr_t gate_ptr, int gate_kind,
            int64_t gate_s0, int64_t gate_s1, int64_t T, int64_t D, int64_t R, float alpha, uint32_t seed,
            uint32_t dropout_threshold, float dropout_scale, uintptr_t stream) {
  LK_CHECK_NONNEG(T);
  LK_CHECK_NONNEG(D);
  LK_CHECK_NONNEG(R);
  LK_CHECK(T <= INT32_MAX, "shrink: T must be <= 2^31 - 1, got ", T);
  LK_CHECK((R + 3) / 4 <= 65535, "shrink: R must be <= 262140, got ", R);
  LK_CHECK_DTYPE(in_dtype);
  LK_CHECK_DTYPE(m_dtype);
  LK_CHECK(gate_kind >= kGateNone && gate_kind <= kGateToken, "gate_kind must be 0 (none), 1 (per-rank) or 2 (per-token), got ",
           gate_kind);
  if (T == 0 || R == 0) return;
  LK_CHECK_PTR(out_ptr);
  LK_CHECK(out_s0 >= R, "out_s0 (row stride of out [T, R]) must be >= R = ", R, ", got ", out_s0);
  if (D > 0) {
    LK_CHECK_PTR(in_ptr);
    LK_CHECK_PTR(m_ptr);
  }
  if (hg_ptr != 0) LK_CHECK(hg_s0 >= R, "hg_s0 (row stride of hg [T, R]) must be >= R = ", R, ", got ", hg_s0);
  if (gate_kind != 0) {
    LK_CHECK(hg_ptr != 0, "gate_kind = ", gate_kind, " needs hg_ptr, the gated output");
    LK_CHECK_PTR(gate_ptr);
  }
  ShrinkArgs a{};
  a.in = reinterpret_cast<const void*>(in_ptr); a.in_dtype = in_dtype; a.in_s0 = in_s0; a.in_s1 = in_s1;
  a.m = reinterpret_cast<const void*>(m_ptr); a.m_dtype = m_dtype; a.m_s0 = m_s0; a.m_s1 = m_s1;
  a.out = reinterpret_cast<float*>(out_ptr); a.out_s0 = out_s0;
  a.hg = reinterpret_cast<float*>(hg_ptr); a.hg_s0 = hg_s0;
  a.gate = reinterpret_cast<const float*>(gate_ptr); a.gate_kind = gate_kind; a.gate_s0 = gate_s0; a.gate_s1 = gate_s1;
  a.T = T; a.D = D; a.R = R; a.alpha = alpha;
  a.dropout = dropout_args(seed, dropout_threshold, dropout_scale);
  LK_CHECK_CUDA("shrink", launch_shrink(a, as_stream(stream)));
}

void expand_add(uintptr_t y_ptr, int y_dtype, int64_t y_s0, int64_t y_s1, uintptr_t h_ptr, int64_t h_s0, int64_t h_s1,
                uintptr_t m_ptr, int m_dtype, int64_t m_s0, int64_t m_s1, int64_t T, int64_t N, int64_t R, float alpha,
                uint32_t seed, uint32_t dropout_threshold, float dropout_scale, uintptr_t stream) {
  LK_CHECK_NONNEG(T);
  LK_CHECK_NONNEG(N);
  LK_CHECK_NONNEG(R);
  LK_CHECK((T + 3) / 4 <= 65535, "expand_add: T must be <= 262140, got ", T);
  LK_CHECK((N + 127) / 128 <= INT32_MAX, "expand_add: N is too large, got ", N);
  LK_CHECK_DTYPE(y_dtype);
  LK_CHECK_DTYPE(m_dtype);
  if (T == 0 || N == 0 || R == 0) return;
  LK_CHECK_PTR(y_ptr);
  LK_CHECK_PTR(h_ptr);
  LK_CHECK_PTR(m_ptr);
  ExpandArgs a{};
  a.y = reinterpret_cast<void*>(y_ptr); a.y_dtype = y_dtype; a.y_s0 = y_s0; a.y_s1 = y_s1;
  a.h = reinterpret_cast<const float*>(h_ptr); a.h_s0 = h_s0; a.h_s1 = h_s1;
  a.m = reinterpret_cast<const void*>(m_ptr); a.m_dtype = m_dtype; a.m_s0 = m_s0; a.m_s1 = m_s1;
  a.T = T; a.N = N; a.R = R; a.alpha = alpha;
  a.dropout = dropout_args(seed, dropout_threshold, dropout_scale);
  LK_CHECK_CUDA("expand_add", launch_expand_add(a, as_stream(stream)));
}

void sensitivity_update(uintptr_t table_ptr, int64_t n_tensors, int64_t total_chunks, uintptr_t scores_ptr,
                        uintptr_t nonfinite_ptr, float beta1, float beta2, uintptr_t stream) {
  LK_CHECK_NONNEG(n_tensors);
  LK_CHECK_NONNEG(total_chunks);
  LK_CHECK(total_chunks <= INT32_MAX, "total_chunks must be <= 2^31 - 1, got ", total_chunks);
  LK_CHECK(beta1 >= 0.f && beta1 < 1.f, "beta1 must be in [0, 1), got ", beta1);
  LK_CHECK(beta2 >= 0.f && beta2 < 1.f, "beta2 must be in [0, 1), got ", beta2);
  if (n_tensors == 0 || total_chunks == 0) return;
  LK_CHECK_PTR(table_ptr);
  LK_CHECK_PTR(scores_ptr);
  LK_CHECK_PTR(nonfinite_ptr);
  SensitivityArgs a{};
  a.table = reinterpret_cast<const int64_t*>(table_ptr);
  a.n_tensors = n_tensors;
  a.total_chunks = total_chunks;
  a.scores = reinterpret_cast<float*>(scores_ptr);
  a.nonfinite = reinterpret_cast<uint8_t*>(nonfinite_ptr);
  a.beta1 = beta1;
  a.beta2 = beta2;
  LK_CHECK_CUDA("sensitivity_update", launch_sensitivity_update(a, as_stream(stream)));
}

// The kernels' keep mask computed on the host, row-major [rows, cols] as bytes: lets a CPU test check the
// hash against lora_kernels/reference.py without a GPU.
py::bytes dropout_keep_host(uint32_t seed, int64_t rows, int64_t cols, uint32_t threshold) {
  LK_CHECK_NONNEG(rows);
  LK_CHECK_NONNEG(cols);
  LK_CHECK(rows * cols <= (int64_t(1) << 26), "dropout_keep_host: rows * cols must be <= 2^26, got ", rows * cols);
  std::string out(static_cast<size_t>(rows * cols), '\0');
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t rh = dropout_row_hash(seed, static_cast<uint32_t>(r));
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = dropout_keep(rh, static_cast<uint32_t>(c), threshold);
  }
  return py::bytes(out);
}

}  // namespace

PYBIND11_MODULE(_lora_kernels_cuda, mod) {
  mod.doc() = "lora-kernels CUDA launchers (raw device pointers, element strides, stream handles as ints)";
  export_dtype_codes(mod);
  mod.attr("SENS_CHUNK") = kSensChunk;
  mod.attr("SENS_TABLE_COLS") = static_cast<int>(kSensTableCols);
#ifdef LK_CUDA_ARCHS
  mod.attr("CUDA_ARCHS") = LK_CUDA_ARCHS;
#endif
  mod.attr("LAUNCHERS") = py::make_tuple("shrink", "expand_add", "sensitivity_update");
  mod.def("shrink", &shrink,
          "out[t, r] = alpha * sum_d dropout(in)[t, d] * m[r, d] (fp32), hg = out * gate when hg != 0",
          py::arg("in_ptr"), py::arg("in_dtype"), py::arg("in_s0"), py::arg("in_s1"), py::arg("m_ptr"),
          py::arg("m_dtype"), py::arg("m_s0"), py::arg("m_s1"), py::arg("out_ptr"), py::arg("out_s0"),
          py::arg("hg_ptr"), py::arg("hg_s0"), py::arg("gate_ptr"), py::arg("gate_kind"), py::arg("gate_s0"),
          py::arg("gate_s1"), py::arg("T"), py::arg("D"), py::arg("R"), py::arg("alpha"), py::arg("seed"),
          py::arg("dropout_threshold"), py::arg("dropout_scale"), py::arg("stream"));
  mod.def("expand_add", &expand_add,
          "y[t, n] += alpha * dropout_mask[t, n] * sum_r h[t, r] * m[n, r] (h fp32, y read-modify-write)",
          py::arg("y_ptr"), py::arg("y_dtype"), py::arg("y_s0"), py::arg("y_s1"), py::arg("h_ptr"),
          py::arg("h_s0"), py::arg("h_s1"), py::arg("m_ptr"), py::arg("m_dtype"), py::arg("m_s0"), py::arg("m_s1"),
          py::arg("T"), py::arg("N"), py::arg("R"), py::arg("alpha"), py::arg("seed"),
          py::arg("dropout_threshold"), py::arg("dropout_scale"), py::arg("stream"));
  mod.def("dropout_keep_host", &dropout_keep_host, "host copy of the kernels' dropout keep mask, [rows, cols] bytes",
          py::arg("seed"), py::arg("rows"), py::arg("cols"), py::arg("threshold"));
  mod.def("sensitivity_update", &sensitivity_update,
          "non-finite check of every gradient, then the fused EMA/score update of every adapter tensor",
          py::arg("table_ptr"), py::arg("n_tensors"), py::arg("total_chunks"), py::arg("scores_ptr"),
          py::arg("nonfinite_ptr"), py::arg("beta1"), py::arg("beta2"), py::arg("stream"));
}
