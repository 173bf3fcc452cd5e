"""The gated LoRA linear op family: ``op`` (the public op), ``reference`` (readable torch: the oracle and the CPU
path), ``triton`` and ``cuda`` (GPU backends), ``split`` (ShareLoRA's shrink-once / expand ops).

Importing this package registers ``torch.ops.lora_kernels.gated_lora_*``; it imports neither triton nor the
compiled module.
"""
from .op import active_ranks, compacted_ranks, gated_lora, lora_linear, new_dropout_seed

__all__ = ["lora_linear", "gated_lora", "active_ranks", "compacted_ranks", "new_dropout_seed"]
