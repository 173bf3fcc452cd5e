#!/usr/bin/env bash
# The whole GPU suite in one call (GPU time is scarce): build the CUDA module for this machine's Python,
# run the GPU tests, run the GPU benchmarks of every kernel family (bench/bench_gpu.py); logs and the result
# files gated_gpu_<card>.{json,csv} and kernels_gpu_<card>.{json,csv} go to $OUT (default ./out/gpu).
#   device run:  bash bench/gpu_suite.sh
# The GPU machine has no internet: pybind11 headers come from pip if installed there, otherwise carry
# them in .carry/pybind11 (python -c "import pybind11; print(pybind11.get_include())" → copy that folder).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/card.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/card.txt"

t0=$(date +%s)
if ! python -c "import pybind11" 2>/dev/null && [ -d .carry/pybind11 ]; then
  export PYTHONPATH="$PWD/.carry:${PYTHONPATH:-}"
fi
LORA_KERNELS_BUILD_CUDA=1 LORA_KERNELS_CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" \
  python setup.py build_ext --inplace > "$OUT/build.log" 2>&1; build_rc=$?
echo "build rc=$build_rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
python -c "import lora_kernels; print(lora_kernels.available_backends())" | tee -a "$OUT/summary.txt"

python -m pytest -q tests/gpu tests/lora_kernels/test_cuda_wrappers.py -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1; tests_rc=$?
echo "gpu tests rc=$tests_rc" | tee -a "$OUT/summary.txt"
tail -n 3 "$OUT/gpu_tests.log" | tee -a "$OUT/summary.txt"

# The bench gets what is left of the call (the device limit is 10 min; SUITE_LIMIT_S leaves a margin), at most
# 420 s: families that would start within ~60 s of the end are recorded as skipped, and the result files are
# rewritten after every family, so a run cut off by `timeout` still leaves what finished.
left=$(( ${SUITE_LIMIT_S:-570} - ($(date +%s) - t0) ))
bench_s=$(( left < 420 ? left : 420 ))
[ "$bench_s" -lt 60 ] && bench_s=60
t1=$(date +%s)
budget_s=$(( bench_s > 120 ? bench_s - 60 : bench_s / 2 ))
timeout -k 15 "$bench_s" python -m bench.bench_gpu --out "$OUT" --budget-s "$budget_s" > "$OUT/bench.log" 2>&1
echo "bench rc=$? in $(( $(date +%s) - t1 )) s (limit ${bench_s} s)" | tee -a "$OUT/summary.txt"
ls "$OUT"/gated_gpu_* "$OUT"/kernels_gpu_* 2>/dev/null | tee -a "$OUT/summary.txt"
grep -c '"error"' "$OUT"/kernels_gpu_*.json "$OUT"/gated_gpu_*.json 2>/dev/null | sed 's/^/error rows: /' | tee -a "$OUT/summary.txt"
tail -n 40 "$OUT/bench.log"

# One table against docs/PERFORMANCE.md §4, and the verdict: non-zero on any correctness failure (a failed build,
# failed GPU tests, a provider that raised, a kernel off its peer), never for a performance target missed.
python -m bench.gpu_summary "$OUT" | tee "$OUT/targets.md"; summary_rc=${PIPESTATUS[0]}
if [ "$build_rc" -ne 0 ] || [ "$tests_rc" -ne 0 ] || [ "$summary_rc" -ne 0 ]; then
  echo "GPU SUITE FAILED (build rc=$build_rc, gpu tests rc=$tests_rc, summary rc=$summary_rc)"; exit 1
fi
echo "GPU suite passed"
