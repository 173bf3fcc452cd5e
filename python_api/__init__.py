"""python_api: what users touch — adapter layers, model surgery, allocators, checkpoints, PEFT interop.

Names load lazily so ``import python_api`` stays cheap (torch only) and never touches CUDA. Every name below, and
the allocator submodules (``python_api.shaplora``, ``.adalora``, ``.alphalora``, ``.sensitivity``), resolves on
first attribute access without importing anything first. The application (demo, ``train``, CLI) lives in
:mod:`python_api.app` and is never imported by the library.
"""
from __future__ import annotations

import importlib

from lora_kernels import __version__, available_backends

# public name -> module that defines it
_EXPORTS = {
    "lora_linear": "lora_kernels.gated_lora",
    "LoRALinear": ".layers",
    "AdapterConfig": ".config",
    "apply_adapters": ".surgery",
    "count_trainable": ".surgery",
    "merge_adapters": ".surgery",
    "unmerge_adapters": ".surgery",
    "adapter_layers": ".surgery",
    "iter_adapters": ".surgery",
    "save_adapters": ".checkpoint",
    "load_adapters": ".checkpoint",
    "CheckpointError": ".checkpoint",
    "SensitivityTracker": ".allocators.sensitivity",
    "AdaLoRAAllocator": ".allocators.adalora",
    "shapley_sensitivity": ".allocators.shaplora",
    "allocate_ranks": ".allocators.shaplora",
    "shaplora_workflow": ".allocators.shaplora",
    "shaplora_allocate": ".allocators.shaplora",
    "adalora_callback": ".allocators.callbacks",
    "shaplora_with_trainer": ".allocators.callbacks",
    "to_peft_rank_pattern": ".allocators.shaplora",
    "to_peft_lora_config": ".allocators.shaplora",
    "to_merged_basis": ".allocators.shaplora",
    "SupernetNotLearnedError": ".allocators.shaplora",
    "orthogonality_penalty": ".allocators.adalora",
    "DEFAULT_MIN_EXPERTS": ".allocators.alphalora",
    "alpha_hill": ".allocators.alphalora",
    "layer_alphas": ".allocators.alphalora",
    "allocate_experts": ".allocators.alphalora",
    "mola_experts": ".allocators.alphalora",
    "top_k_for": ".allocators.alphalora",
    "MoELoRALinear": ".moe",
    "apply_moe_adapters": ".moe",
    "moe_aux_loss": ".moe",
    "export_peft": ".peft_interop",
    "import_peft": ".peft_interop",
}
# submodules reachable as attributes (``lk.shaplora.shaplora_workflow``) without an import first
_SUBMODULES = {
    "shaplora": ".allocators.shaplora",
    "adalora": ".allocators.adalora",
    "alphalora": ".allocators.alphalora",
    "sensitivity": ".allocators.sensitivity",
    "allocators": ".allocators",
    "layers": ".layers",
    "surgery": ".surgery",
    "share": ".share",
    "moe": ".moe",
    "config": ".config",
    "checkpoint": ".checkpoint",
    "peft_interop": ".peft_interop",
    "distributed": ".distributed",
}

__all__ = ["__version__", "available_backends", *_EXPORTS, *_SUBMODULES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        value = importlib.import_module(_SUBMODULES[name], __name__)
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    else:
        raise AttributeError(f"module 'python_api' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
