"""Packaging for lora-kernels; builds its optional compiled modules with CMake, one configure each:
lora_kernels._lora_kernels_cpu (gcc only: the fused CPU sensitivity loop) and lora_kernels._lora_kernels_cuda.

LORA_KERNELS_BUILD_CPU: unset = build (a failed build warns and the package installs without it: the
pure-torch path still works); 1 = build or fail loudly; 0 = never build.
LORA_KERNELS_BUILD_CUDA: unset = build when nvcc is found (a failed build then warns and the package
installs without it: the torch/Triton backends still work); 1 = build or fail loudly; 0 = never build.
The CUDA toolkit is found through CUDA_HOME / CUDA_PATH, then nvcc on PATH, then /usr/local/cuda.
Extra CMake arguments: LORA_KERNELS_CMAKE_ARGS (e.g. "-DCMAKE_CUDA_ARCHITECTURES=90").
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
ENV_BUILD = "LORA_KERNELS_BUILD_CUDA"
EXT_NAME = "lora_kernels._lora_kernels_cuda"
ENV_BUILD_CPU = "LORA_KERNELS_BUILD_CPU"
CPU_EXT_NAME = "lora_kernels._lora_kernels_cpu"


def read_version() -> str:
    with open(os.path.join(ROOT, "lora_kernels", "_version.py")) as f:
        match = re.search(r'^__version__ = "([^"]+)"', f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError("lora_kernels/_version.py does not define __version__")
    return match.group(1)


def find_nvcc() -> str | None:
    """The real nvcc of a toolkit (not a wrapper script), so CMake can find the toolkit next to it."""
    candidates = [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(on_path)
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return resolve_nvcc(c)
    return None


def resolve_nvcc(path: str) -> str:
    # A wrapper script on PATH (e.g. /usr/local/bin/nvcc -> exec /usr/local/cuda-X/bin/nvcc) hides the
    # toolkit root from CMake; follow symlinks, then ask the driver for its own directory.
    real = os.path.realpath(path)
    try:
        cmd = [real, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull]
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            if "_HERE_=" in line:
                cand = os.path.join(line.split("=", 1)[1].strip(), "nvcc")
                if os.path.isfile(cand):
                    return cand
    except (OSError, subprocess.SubprocessError):
        pass
    return real


def build_mode(env: str = ENV_BUILD) -> str:
    val = os.environ.get(env, "").strip()
    if val not in ("", "0", "1"):
        raise SystemExit(f"{env}={val!r}: expected 1 (force), 0 (skip) or unset (auto)")
    return {"": "auto", "0": "skip", "1": "force"}[val]


class CMakeExtension(Extension):
    def __init__(self, name: str, cuda: bool):
        super().__init__(name, sources=[])
        self.cuda = cuda


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt, placing the module where setuptools expects the extension
    (inside lora_kernels/ for editable installs, the build tree for wheels)."""

    def run(self):
        for ext in self.extensions:
            self.build_cmake(ext)

    def build_cmake(self, ext: Extension):
        env = ENV_BUILD if ext.cuda else ENV_BUILD_CPU
        mode = build_mode(env)
        nvcc = find_nvcc() if ext.cuda else None
        try:
            if ext.cuda and nvcc is None:
                raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
            if shutil.which("cmake") is None:
                raise RuntimeError("cmake not found on PATH")
            self._cmake(ext, nvcc)
        except Exception as e:
            what = "CUDA" if ext.cuda else "CPU"
            if mode == "force":
                raise RuntimeError(f"{env}=1 but the {what} module could not be built: {e}") from e
            still = "the torch and Triton backends" if ext.cuda else "the pure-torch sensitivity path"
            print(f"WARNING: lora-kernels installs without its {what} module ({e}); {still} still work. "
                  f"Set {env}=1 to make this an error.", file=sys.stderr)

    def _cmake(self, ext: Extension, nvcc: str | None):
        import pybind11

        out_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        out_dir = os.path.dirname(out_path)
        # One configure per module: a broken CUDA toolkit cannot take the CPU module down with it.
        build_dir = os.path.join(os.path.abspath(self.build_temp), "cmake-cuda" if ext.cuda else "cmake-cpu")
        os.makedirs(build_dir, exist_ok=True)
        if ext.cuda:
            which = ["-DLORA_KERNELS_BUILD_CPU=OFF", "-DLORA_KERNELS_BUILD_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     f"-DCUDAToolkit_ROOT={os.path.dirname(os.path.dirname(nvcc))}"]
        else:
            which = ["-DLORA_KERNELS_BUILD_CPU=ON", "-DLORA_KERNELS_BUILD_CUDA=OFF"]
        args = [
            "cmake", "-S", ROOT, "-B", build_dir, *which,
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DLORA_KERNELS_OUTPUT_DIR={out_dir}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        args += shlex.split(os.environ.get("LORA_KERNELS_CMAKE_ARGS", ""))
        jobs = str(os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or os.cpu_count() or 1)
        t0 = time.perf_counter()
        subprocess.run(args, check=True)
        subprocess.run(["cmake", "--build", build_dir, "--parallel", jobs], check=True)
        built = os.path.join(out_dir, os.path.basename(out_path))
        if not os.path.isfile(built):
            raise RuntimeError(f"CMake finished but {built} is missing")
        print(f"lora-kernels: built {built} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


ext_modules = ([] if build_mode(ENV_BUILD_CPU) == "skip" else [CMakeExtension(CPU_EXT_NAME, cuda=False)]) + \
              ([] if build_mode(ENV_BUILD) == "skip" else [CMakeExtension(EXT_NAME, cuda=True)])

setup(
    name="lora-kernels",
    version=read_version(),
    description="Kernels for masked variable-rank, gated and shared LoRA (ShapLoRA, ShareLoRA, AlphaLoRA)",
    python_requires=">=3.10",
    packages=find_packages(include=["lora_kernels", "lora_kernels.*", "python_api", "python_api.*", "bench"]),
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm", "matplotlib"],
    extras_require={
        "triton": ["triton>=3.0"],
        "hf": ["transformers", "peft"],
        "alpha": ["weightwatcher", "powerlaw"],
        "test": ["pytest", "ruff"],
    },
    entry_points={"console_scripts": ["lora-kernels = python_api.app.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
