"""The CUDA module builds, holds sm_80 and sm_90 code for every kernel file, and imports without a GPU.

Needs nvcc and cmake (skips otherwise). Reuses the module that `pip install -e .` put in lora_kernels/
when it is newer than every source; else configures and builds CMakeLists.txt into a temp dir.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
CU_FILES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "*.cu")))
ARCHS = ("80", "90")
LAUNCHERS = ("shrink", "expand_add", "sensitivity_update", "dropout_keep_host")


def _real_nvcc() -> str | None:
    """nvcc from CUDA_HOME, PATH or /usr/local/cuda, resolved through wrapper scripts to the toolkit's own."""
    cands = [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    cands += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            out = subprocess.run([c, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], check=False,
                                 capture_output=True, text=True, timeout=60)
            here = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
            return os.path.join(here.group(1), "nvcc") if here else os.path.realpath(c)
    return None


NVCC = _real_nvcc()
needs_toolchain = pytest.mark.skipif(NVCC is None or shutil.which("cmake") is None,
                                     reason="nvcc or cmake not found: the CUDA module cannot be built here")


def _cuobjdump() -> str | None:
    cands = [os.path.join(os.path.dirname(NVCC), "cuobjdump")] if NVCC else []
    cands.append(shutil.which("cuobjdump") or "")
    spec = importlib.util.find_spec("triton")  # triton wheels bundle one; it reads these fatbins too
    if spec is not None and spec.origin:
        cands.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _cmake_listed_sources() -> list[str]:
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        text = f.read()
    block = re.search(r"set\(LORA_KERNELS_CUDA_SOURCES(.*?)\)", text, re.DOTALL)
    assert block, "CMakeLists.txt must define LORA_KERNELS_CUDA_SOURCES"
    return block.group(1).split()


def test_every_cu_file_is_listed_in_cmake():
    assert CU_FILES, "no .cu files under csrc/"
    missing = sorted(set(CU_FILES) - set(_cmake_listed_sources()))
    assert not missing, f"csrc files not compiled (add them to LORA_KERNELS_CUDA_SOURCES): {missing}"


def _cmake_build(tmp_path_factory, name: str, extra: list[str], timeout: int):
    """Configures and builds the project with CMake into a fresh directory; returns ``(build dir, output dir)``."""
    import pybind11
    build = tmp_path_factory.mktemp(name)
    out = build / "out"
    cmd = ["cmake", "-S", ROOT, "-B", str(build), *extra, f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
           f"-DPython_EXECUTABLE={sys.executable}", f"-DLORA_KERNELS_OUTPUT_DIR={out}"] + \
        (["-G", "Ninja"] if shutil.which("ninja") else [])
    for step in (cmd, ["cmake", "--build", str(build), "--parallel", str(os.cpu_count() or 2)]):
        res = subprocess.run(step, check=False, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, f"{' '.join(step)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return build, out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(path to the .so, build dir or None when the installed module was reused)``."""
    sources = glob.glob(os.path.join(CSRC, "*")) + [os.path.join(ROOT, "CMakeLists.txt")]
    newest_src = max(os.path.getmtime(p) for p in sources)
    for so in glob.glob(os.path.join(ROOT, "lora_kernels", "_lora_kernels_cuda*.so")):
        if os.path.getmtime(so) > newest_src:
            return so, None
    build, out = _cmake_build(tmp_path_factory, "cmake_build", [f"-DCMAKE_CUDA_COMPILER={NVCC}"], timeout=1200)
    sos = glob.glob(str(out / "_lora_kernels_cuda*.so"))
    assert len(sos) == 1, f"expected one module in {out}, found {sos}"
    return sos[0], str(build)


@needs_toolchain
def test_every_cu_file_is_compiled(built):
    _, build = built
    if build is None:
        pytest.skip("reused the installed module: no build tree (test_binary_has_sm80_and_sm90_code checks "
                    "each kernel file's cubins instead)")
    with open(os.path.join(build, "compile_commands.json")) as f:
        compiled = {os.path.relpath(os.path.realpath(e["file"]), os.path.realpath(ROOT)) for e in json.load(f)}
    missing = sorted(set(CU_FILES) - compiled)
    assert not missing, f"csrc files not compiled: {missing}"


@needs_toolchain
def test_binary_has_sm80_and_sm90_code(built):
    so, _ = built
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump found (CUDA toolkit bin, PATH, or triton's bundled one)")
    res = subprocess.run([tool, "--list-elf", so], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    # cuobjdump names each cubin <source stem>.sm_<arch>.cubin: one per kernel file and architecture.
    want = {f"{os.path.splitext(os.path.basename(cu))[0]}.sm_{a}.cubin" for cu in CU_FILES for a in ARCHS}
    missing = sorted(w for w in want if w not in res.stdout)
    assert not missing, f"missing device code {missing} in {so}; cuobjdump says:\n{res.stdout}"


_IMPORT_CHECK = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("lora_kernels._lora_kernels_cuda", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
maps = open("/proc/self/maps").read()
errors = {}
def err(fn, **kw):
    try:
        fn(**kw)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
base = dict(in_ptr=1, in_dtype=0, in_s0=8, in_s1=1, m_ptr=1, m_dtype=0, m_s0=8, m_s1=1, out_ptr=1, out_s0=4,
            hg_ptr=0, hg_s0=0, gate_ptr=0, gate_kind=0, gate_s0=0, gate_s1=0, T=2, D=8, R=4, alpha=1.0, seed=0,
            dropout_threshold=0, dropout_scale=1.0, stream=0)
errors["dtype"] = err(mod.shrink, **{**base, "in_dtype": 7})
errors["null"] = err(mod.shrink, **{**base, "out_ptr": 0})
errors["neg"] = err(mod.shrink, **{**base, "D": -1})
errors["gate"] = err(mod.shrink, **{**base, "gate_kind": 1, "gate_ptr": 1})
errors["p"] = err(mod.shrink, **{**base, "dropout_threshold": (1 << 24) + 1})
errors["beta"] = err(mod.sensitivity_update, table_ptr=1, n_tensors=1, total_chunks=1, scores_ptr=1,
                     nonfinite_ptr=1, beta1=1.5, beta2=0.85, stream=0)
errors["empty"] = err(mod.shrink, **{**base, "T": 0, "out_ptr": 0})  # nothing to do: no error, no CUDA call
print(json.dumps({"names": [n for n in dir(mod) if not n.startswith("_")], "launchers": list(mod.LAUNCHERS),
                  "libcuda": "libcuda.so" in maps, "torch": "torch" in sys.modules, "errors": errors,
                  "archs": getattr(mod, "CUDA_ARCHS", None)}))
"""


@needs_toolchain
def test_module_imports_without_gpu_and_checks_arguments(built):
    so, _ = built
    res = subprocess.run([sys.executable, "-c", _IMPORT_CHECK, so], check=False, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, f"importing {so} failed:\n{res.stderr}"
    info = json.loads(res.stdout.strip().splitlines()[-1])
    for name in LAUNCHERS:
        assert name in info["names"], f"launcher {name!r} missing from the module: {info['names']}"
    assert set(info["launchers"]) <= set(info["names"])
    # Importing makes no CUDA call: the static runtime loads the driver (libcuda) only on first use.
    assert not info["libcuda"], "importing the module loaded libcuda.so (a CUDA call at import)"
    assert not info["torch"], "the compiled module must not import torch"
    assert info["archs"] == ",".join(ARCHS)
    errors = info["errors"]
    assert errors["dtype"].startswith("ValueError") and "in_dtype" in errors["dtype"] and "7" in errors["dtype"]
    assert errors["null"].startswith("ValueError") and "out_ptr" in errors["null"]
    assert errors["neg"].startswith("ValueError") and "D must be >= 0" in errors["neg"]
    assert errors["gate"].startswith("ValueError") and "hg_ptr" in errors["gate"]
    assert errors["p"].startswith("ValueError") and "dropout_threshold" in errors["p"]
    assert errors["beta"].startswith("ValueError") and "beta1" in errors["beta"]
    assert errors["empty"] is None


# ---- the CPU module (gcc + cmake only: no nvcc) ------------------------------------------------------------
CPU_FILES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")


def test_every_cpu_source_is_listed_in_cmake():
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        block = re.search(r"set\(LORA_KERNELS_CPU_SOURCES(.*?)\)", f.read(), re.DOTALL)
    assert block, "CMakeLists.txt must define LORA_KERNELS_CPU_SOURCES"
    assert CPU_FILES, "no .cpp files under csrc/cpu/"
    missing = sorted(set(CPU_FILES) - set(block.group(1).split()))
    assert not missing, f"csrc/cpu files not compiled (add them to LORA_KERNELS_CPU_SOURCES): {missing}"


@pytest.fixture(scope="module")
def built_cpu(tmp_path_factory):
    """A fresh CPU-only build (LORA_KERNELS_BUILD_CUDA=OFF, no CUDA compiler passed): ~15 s on 2 cores."""
    build, out = _cmake_build(tmp_path_factory, "cmake_cpu", ["-DLORA_KERNELS_BUILD_CUDA=OFF"], timeout=600)
    sos = glob.glob(str(out / "_lora_kernels_c*.so"))
    assert len(sos) == 1 and "_lora_kernels_cpu" in sos[0], f"expected only the CPU module in {out}, found {sos}"
    with open(build / "compile_commands.json") as f:
        compiled = {os.path.relpath(os.path.realpath(e["file"]), os.path.realpath(ROOT)) for e in json.load(f)}
    assert not any(c.endswith(".cu") for c in compiled), f"a CPU-only build compiled CUDA sources: {compiled}"
    assert set(CPU_FILES) <= compiled, f"csrc/cpu files not compiled: {sorted(set(CPU_FILES) - compiled)}"
    return sos[0]


_CPU_IMPORT_CHECK = r"""
import array, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("lora_kernels._lora_kernels_cpu", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
# One E tensor of 3 fp32 entries through raw buffers: ipt = 0.5*1 + 0.5*|2*3| = 3.5, unc = 0.5*1 + 0.5*2.5.
w, g, i, u, s = (array.array("f", v) for v in ([2.0] * 3, [3.0] * 3, [1.0] * 3, [1.0] * 3, [0.0] * 3))
ptr = lambda a: a.buffer_info()[0]
row = array.array("q", [ptr(w), ptr(g), ptr(i), ptr(u), 3, 0, mod.DTYPE_F32, 1, 0])
bad = mod.sensitivity_update(ptr(row), 1, ptr(s), 3, 0.5, 0.5, 1)
try:
    mod.sensitivity_update(ptr(row), 1, ptr(s), 2, 0.5, 0.5, 1)
    err = None
except ValueError as e:
    err = str(e)
print(json.dumps({"bad": bad, "ipt": list(i), "unc": list(u), "scores": list(s), "err": err,
                  "cols": mod.SENS_TABLE_COLS, "torch": "torch" in sys.modules}))
"""


@needs_cmake
def test_cpu_module_builds_without_nvcc_and_runs_without_torch(built_cpu):
    res = subprocess.run([sys.executable, "-c", _CPU_IMPORT_CHECK, built_cpu], check=False, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, f"importing {built_cpu} failed:\n{res.stderr}"
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert not info["torch"], "the compiled CPU module must not import torch"
    assert info["cols"] == 9 and info["bad"] is False
    assert info["ipt"] == [3.5] * 3 and info["unc"] == [1.75] * 3 and info["scores"] == [3.5 * 1.75] * 3
    assert info["err"] and "n_scores 2" in info["err"]
