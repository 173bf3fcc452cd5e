"""The sensitivity op family (AdaLoRA's EMA and the per-rank triplet score): ``op`` (the public op, validation,
dispatch), ``reference`` (readable torch), ``native_cpu`` (the compiled CPU loop), ``triton``, ``cuda``."""
from .op import (KIND_A, KIND_B, KIND_E, SensitivityPlan, check_sensitivity_args, fused_sensitivity_update,
                 per_example_gate_grad, ranks_of)

__all__ = ["fused_sensitivity_update", "SensitivityPlan", "per_example_gate_grad", "check_sensitivity_args",
           "ranks_of", "KIND_E", "KIND_A", "KIND_B"]
