"""Boundary validation: every error names the argument and the offending value."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, *, dims: int | tuple[int, ...] | None = None, float_only: bool = True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None:
        allowed = (dims,) if isinstance(dims, int) else dims
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if float_only and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got dtype {t.dtype}")


def check_gated_lora_args(x, weight, bias, lora_a, lora_b, gate, dropout_p, scale) -> str:
    """Validates the gated LoRA linear's arguments (x may have any leading shape). Returns the gate kind
    ("none" | "rank" | "token")."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim [..., K], got shape {tuple(x.shape)}")
    check_tensor("weight", weight, dims=2)
    check_tensor("lora_a", lora_a, dims=2)
    check_tensor("lora_b", lora_b, dims=2)
    N, K = weight.shape
    R = lora_a.shape[0]
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but weight expects K={K} "
                         f"(weight shape {tuple(weight.shape)})")
    if lora_a.shape[1] != K:
        raise ValueError(f"lora_a must be [R, K] = [R, {K}], got shape {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (N, R):
        raise ValueError(f"lora_b must be [N, R] = [{N}, {R}], got shape {tuple(lora_b.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dims=1)
        if bias.shape[0] != N:
            raise ValueError(f"bias must be [N] = [{N}], got shape {tuple(bias.shape)}")
    gate_kind = "none"
    if gate is not None:
        check_tensor("gate", gate, dims=(1, 2))
        T = x.numel() // K if K else 0
        if gate.dim() == 1:
            if gate.shape[0] != R:
                raise ValueError(f"gate (per-rank mask/values) has length {gate.shape[0]}, expected R={R}")
            gate_kind = "rank"
        else:
            if tuple(gate.shape) != (T, R):
                raise ValueError(f"gate (per-token) must be [T, R] = [{T}, {R}] with T = x.numel() // K, "
                                 f"got shape {tuple(gate.shape)}")
            gate_kind = "token"
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number, got {type(scale).__name__}")
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b, "gate": gate}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must share one device")
    # Frozen weight/bias follow x's dtype; adapters may be fp32 master weights (mixed precision).
    for name in ("weight", "bias"):
        t = tensors[name]
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}: the frozen weight and bias must "
                            "match x's dtype (cast the layer, or use autocast)")
    if lora_a.dtype != lora_b.dtype:
        raise TypeError(f"lora_a ({lora_a.dtype}) and lora_b ({lora_b.dtype}) must share one dtype")
    return gate_kind
