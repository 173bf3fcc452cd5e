"""lora-kernels: kernels for masked variable-rank, gated and shared LoRA.

Importing this package never initialises CUDA, never imports triton and never loads the compiled
module: backends load on first use (see :mod:`lora_kernels.dispatch`).
"""
from ._version import __version__
from .dispatch import BackendUnavailable, available_backends, requested_backend

__all__ = ["__version__", "available_backends", "requested_backend", "BackendUnavailable"]
