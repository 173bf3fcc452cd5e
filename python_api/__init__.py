"""python_api: what users touch — the functional op, adapter layers, model surgery, allocators,
checkpoints and the CLI. Names load lazily so ``import python_api`` stays cheap and never touches CUDA.
"""
from __future__ import annotations

import importlib

from lora_kernels import __version__, available_backends

# public name -> submodule that defines it
_EXPORTS = {
    "lora_linear": "functional",
    "LoRALinear": "layers",
    "apply_adapters": "surgery",
    "count_trainable": "surgery",
    "merge_adapters": "surgery",
    "unmerge_adapters": "surgery",
    "save_adapters": "checkpoint",
    "load_adapters": "checkpoint",
    "SensitivityTracker": "sensitivity",
    "shapley_sensitivity": "shaplora",
    "allocate_ranks": "shaplora",
    "alpha_hill": "alphalora",
    "layer_alphas": "alphalora",
    "allocate_experts": "alphalora",
    "MoELoRALinear": "moe",
    "apply_moe_adapters": "moe",
    "moe_aux_loss": "moe",
    "mola_experts": "alphalora",
    "top_k_for": "alphalora",
    "adapter_layers": "surgery",
    "to_peft_rank_pattern": "shaplora",
    "export_peft": "peft_interop",
    "import_peft": "peft_interop",
    "CheckpointError": "checkpoint",
}

__all__ = ["__version__", "available_backends", *_EXPORTS]


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'python_api' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
