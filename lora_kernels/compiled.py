"""The package's compiled modules, each loaded on first use (never at package import), keeping the load error.

``cpu_module``: lora_kernels._lora_kernels_cpu (the native sensitivity loop, csrc/cpu);
``cuda_module``: lora_kernels._lora_kernels_cuda (csrc/*.cu).
"""
from __future__ import annotations

import importlib


class CompiledModule:
    def __init__(self, name: str, build_hint: str):
        self.name = name
        self.build_hint = build_hint
        self._state: dict[str, object] = {}

    def load(self):
        """Returns ``(module, None)`` or ``(None, "why it could not be loaded")``; the result is cached."""
        if "mod" not in self._state:
            try:
                self._state["mod"], self._state["err"] = importlib.import_module(self.name), None
            except Exception as e:  # ImportError, or an undefined symbol in a stale build
                self._state["mod"], self._state["err"] = None, f"{type(e).__name__}: {e}"
        return self._state["mod"], self._state["err"]

    def require(self):
        mod, err = self.load()
        if mod is None:
            raise RuntimeError(f"the compiled module {self.name} is not available: {err}. {self.build_hint}")
        return mod


cpu_module = CompiledModule(
    "lora_kernels._lora_kernels_cpu",
    "Build it with `pip install -e . --no-build-isolation` (needs cmake and a C++17 compiler; "
    "LORA_KERNELS_BUILD_CPU=1 makes a failed build an error).")
cuda_module = CompiledModule(
    "lora_kernels._lora_kernels_cuda",
    "Build it with `pip install -e . --no-build-isolation` on a machine with nvcc (LORA_KERNELS_BUILD_CUDA=1 "
    "forces the build).")
