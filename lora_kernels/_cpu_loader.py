"""Loads the compiled CPU module (lora_kernels._lora_kernels_cpu) on first use, never at package import;
keeps the load error. Same interface as :mod:`lora_kernels._cuda_loader`."""
from __future__ import annotations

import importlib

MODULE_NAME = "lora_kernels._lora_kernels_cpu"
_state: dict[str, object] = {}


def load():
    """Returns ``(module, None)`` or ``(None, "why it could not be loaded")``; the result is cached."""
    if "mod" not in _state:
        try:
            _state["mod"], _state["err"] = importlib.import_module(MODULE_NAME), None
        except Exception as e:  # ImportError, or an undefined symbol in a stale build
            _state["mod"], _state["err"] = None, f"{type(e).__name__}: {e}"
    return _state["mod"], _state["err"]


def require():
    mod, err = load()
    if mod is None:
        raise RuntimeError(f"the compiled CPU module {MODULE_NAME} is not available: {err}. "
                           "Build it with `pip install -e . --no-build-isolation` (needs cmake and a C++17 "
                           "compiler; LORA_KERNELS_BUILD_CPU=1 makes a failed build an error).")
    return mod
