"""One dispatcher for every op family.

Each backend says whether it is usable at all (``availability``) and whether it supports one call
(``supports``); the first backend in preference order that qualifies runs. ``LORA_KERNELS_BACKEND``
(auto|torch|native|triton|cuda) forces one: forced-but-unusable raises with the reason, auto falls back.
When nothing qualifies the error lists every backend with its reason.

Backends: ``cuda`` (the compiled CUDA module), ``triton``, ``native`` (the compiled CPU module: the fused
sensitivity loop), ``cpu`` (torch ops in CPU-fast layouts: the gated op's CPU path) and ``torch`` (the readable
references, always usable). An op family registers the backends it has; this is the only place that picks one.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch

ENV_VAR = "LORA_KERNELS_BACKEND"
BACKENDS = ("cuda", "triton", "native", "cpu", "torch")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("native", "cpu", "torch")}


class BackendUnavailable(RuntimeError):
    """Raised when a forced backend cannot run, or when no backend supports a call."""


@dataclass(frozen=True)
class Problem:
    """What a backend needs to know to accept or refuse one call."""
    op: str                  # "gated_lora", "sensitivity", ...
    device: torch.device
    dtype: torch.dtype
    tokens: int = 0          # T
    gate_kind: str = "none"  # "none" | "rank" | "token"
    dropout: bool = False
    dense: bool = True       # every operand contiguous, each (param, grad) pair of one dtype (native loop)


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _torch_availability() -> tuple[bool, str]:
    return True, "pure-torch reference: always usable"


def _triton_availability() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the environment
        return False, f"triton cannot be imported: {e!r}"
    if _triton_interpret():
        return True, f"triton {triton.__version__} in interpreter mode (TRITON_INTERPRET=1): runs on CPU tensors"
    if not torch.cuda.is_available():
        return False, "no CUDA device and TRITON_INTERPRET is not set"
    return True, f"triton {triton.__version__} on CUDA"


def _cpu_availability() -> tuple[bool, str]:
    return True, "torch ops in CPU-fast GEMM layouts: always usable"


def _native_availability() -> tuple[bool, str]:
    from .compiled import cpu_module
    mod, err = cpu_module.load()
    if mod is None:
        return False, f"compiled CPU module not loadable: {err}"
    return True, "compiled CPU module (fused one-pass sensitivity loop)"


def _cuda_availability() -> tuple[bool, str]:
    from .compiled import cuda_module
    mod, err = cuda_module.load()
    if mod is None:
        return False, f"compiled module not loadable: {err}"
    if not torch.cuda.is_available():
        return False, "compiled module loads, but torch sees no CUDA device"
    return True, "compiled CUDA module (skinny shrink/expand kernels, cuBLAS for the dense GEMMs)"


_AVAILABILITY: dict[str, Callable[[], tuple[bool, str]]] = {
    "torch": _torch_availability,
    "triton": _triton_availability,
    "native": _native_availability,
    "cpu": _cpu_availability,
    "cuda": _cuda_availability,
}


def available_backends() -> dict[str, dict[str, object]]:
    """For each of ``torch``, ``cpu``, ``native``, ``triton``, ``cuda``: ``{"usable": bool, "reason": str}``.

    Never initialises CUDA unless torch already can (``torch.cuda.is_available`` does not create a context).
    """
    out = {}
    for name in ("torch", "cpu", "native", "triton", "cuda"):
        ok, why = _AVAILABILITY[name]()
        out[name] = {"usable": ok, "reason": why}
    return out


def requested_backend() -> str:
    val = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if val not in ("auto",) + BACKENDS:
        raise ValueError(f"{ENV_VAR}={val!r} is not one of auto, {', '.join(BACKENDS)}")
    return val


def _supports(name: str, p: Problem, registry: dict) -> tuple[bool, str]:
    ok, why = _AVAILABILITY[name]()
    if not ok:
        return False, why
    if name not in registry:
        return False, f"no {name} implementation of op {p.op!r}"
    return registry[name].supports(p)


def select(p: Problem, registry: dict) -> tuple[str, object]:
    """Pick the implementation for one call. ``registry`` maps backend name → implementation with
    a ``supports(problem) -> (bool, reason)`` method."""
    forced = requested_backend()
    if forced != "auto":
        ok, why = _supports(forced, p, registry)
        if not ok:
            raise BackendUnavailable(f"{ENV_VAR}={forced} but it cannot run op {p.op!r} "
                                     f"on {p.device.type}/{p.dtype}: {why}")
        return forced, registry[forced]
    # auto: CPU tensors never take triton, even with TRITON_INTERPRET=1 (the interpreter is a test vehicle,
    # ~1000x slower than torch).
    order = _AUTO_ORDER.get(p.device.type, ("torch",))
    reasons = []
    for name in order:
        ok, why = _supports(name, p, registry)
        if ok:
            return name, registry[name]
        reasons.append(f"{name}: {why}")
    raise BackendUnavailable(f"no backend can run op {p.op!r} on {p.device.type}/{p.dtype}: " + "; ".join(reasons))


class LazyBackend:
    """A backend module imported on first attribute access (keeps ``import lora_kernels`` free of triton and of
    the compiled modules). ``module`` is relative to ``package``."""

    def __init__(self, module: str, package: str):
        self._module, self._package, self._mod = module, package, None

    def __getattr__(self, item):
        if self._mod is None:
            self._mod = importlib.import_module(self._module, self._package)
        return getattr(self._mod, item)


def reference_backend(**functions) -> SimpleNamespace:
    """The always-usable ``torch`` backend of an op family: its readable reference functions."""
    return SimpleNamespace(supports=lambda p: (True, "pure-torch reference"), **functions)
