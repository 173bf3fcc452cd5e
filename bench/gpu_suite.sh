#!/usr/bin/env bash
# The whole GPU suite in one call (GPU time is scarce): build the CUDA module for this machine's Python,
# run the GPU tests, run the GPU benchmarks; logs and result files go to $OUT (default ./out/gpu).
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
  python setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "build rc=$? in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
python -c "import lora_kernels; print(lora_kernels.available_backends())" | tee -a "$OUT/summary.txt"

python -m pytest -q -x tests/gpu -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?" | tee -a "$OUT/summary.txt"
tail -n 3 "$OUT/gpu_tests.log" | tee -a "$OUT/summary.txt"

python -m bench.bench_gpu --out "$OUT/gated_gpu.json" > "$OUT/bench.log" 2>&1; echo "bench rc=$?" | tee -a "$OUT/summary.txt"
for extra in bench.bench_alloc_gpu bench.bench_alpha_gpu; do
  if python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$extra') is None)"; then
    python -m "$extra" --out "$OUT" >> "$OUT/bench.log" 2>&1; echo "$extra rc=$?" | tee -a "$OUT/summary.txt"
  fi
done
cat "$OUT/bench.log" | tail -n 40
