"""The gated LoRA linear op family: backend registry, dispatch and rank compaction.

Every backend module implements, on 2-D tensors,
    supports(problem) -> (bool, reason)
    gated_lora_forward(x, weight, bias, lora_a, lora_b, scale, gate, dropout_p, seed) -> (y, h)
    gated_lora_backward(dy, x, weight, lora_a, lora_b, h, scale, gate, dropout_p, seed, needs)
        -> (dx, dA, dB, dG)
with exactly the semantics of :mod:`lora_kernels.reference`.
"""
from __future__ import annotations

import importlib
import os

import torch

from . import reference
from .dispatch import Problem, select


class _TorchBackend:
    @staticmethod
    def supports(p: Problem) -> tuple[bool, str]:
        return True, "reference"

    gated_lora_forward = staticmethod(reference.gated_lora_forward)
    gated_lora_backward = staticmethod(reference.gated_lora_backward)


class _Lazy:
    """Imports a backend module on first attribute access (keeps ``import lora_kernels`` lean)."""

    def __init__(self, module: str):
        self._module = module
        self._mod = None

    def __getattr__(self, item):
        if self._mod is None:
            self._mod = importlib.import_module(self._module, __package__)
        return getattr(self._mod, item)


_CPU_FAST = _Lazy(".cpu_fast")
REGISTRY = {
    "torch": _TorchBackend(),
    "triton": _Lazy(".triton_gated"),
    "cuda": _Lazy(".cuda_gated"),
}


def problem(x: torch.Tensor, gate: torch.Tensor | None, dropout_p: float) -> Problem:
    kind = "none" if gate is None else ("rank" if gate.dim() == 1 else "token")
    return Problem("gated_lora", x.device, x.dtype, x.shape[0], kind, dropout_p > 0)


CPU_FAST_ENV = "LORA_KERNELS_CPU_FAST"   # "0": CPU tensors run the reference itself (A/B timing, debugging)


def select_backend(x: torch.Tensor, gate: torch.Tensor | None, dropout_p: float):
    """Returns ``(name, implementation)`` for one call. On CPU the torch backend runs :mod:`.cpu_fast` (the
    reference's products in CPU-friendly GEMM layouts) unless ``LORA_KERNELS_CPU_FAST=0``."""
    p = problem(x, gate, dropout_p)
    name, impl = select(p, REGISTRY)
    if name == "torch" and os.environ.get(CPU_FAST_ENV, "1") != "0" and _CPU_FAST.supports(p)[0]:
        return name, _CPU_FAST
    return name, impl


def active_ranks(gate: torch.Tensor) -> torch.Tensor | None:
    """Indices of the non-zero entries of a per-rank gate, or None when every rank is on.

    Compaction is exact only for a gate that needs no gradient: dG_i is generally non-zero at a
    switched-off rank (ALGORITHMS.md §1), so callers skip compaction when the gate requires grad.
    This reads the mask on the host (one sync); layers cache the result while the mask is unchanged.
    """
    idx = torch.nonzero(gate, as_tuple=False).flatten()
    return None if idx.numel() == gate.numel() else idx
