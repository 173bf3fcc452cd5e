"""lora-kernels: kernels for masked variable-rank, gated and shared LoRA.

Op families, each one folder: :mod:`.gated_lora` (the gated LoRA linear), :mod:`.sensitivity` (the batched
sensitivity EMA), :mod:`.spectra` (eigenvalue spectra and power-law alphas). :mod:`.codes` holds the numbers
shared with the compiled kernels; :mod:`.dispatch` alone picks a backend.

Importing this package never initialises CUDA, never imports triton and never loads a compiled module:
backends load on first use.
"""
from ._version import __version__
from .dispatch import BackendUnavailable, available_backends, requested_backend

__all__ = ["__version__", "available_backends", "requested_backend", "BackendUnavailable"]
