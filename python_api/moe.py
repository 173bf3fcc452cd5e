"""MoE-LoRA (MoLA) layer: E LoRA experts of rank r behind a per-token top-k router (ALGORITHMS.md §5).

    p = softmax(x Rᵀ) in fp32                    # [T, E]   R [E, K], bias-free, trainable, fp32
    w = top-k of p, renormalised to sum 1         # [T, E]   zero outside the top k
    y = x Wᵀ + b + s · Σ_e w_e B_e A_e dropout(x)  # s = alpha / r, one dropout mask shared by the experts

Implemented as ONE gated LoRA op (ALGORITHMS.md §1): A = [A_1; …; A_E] is [E·r, K], B = [B_1 … B_E] is [N, E·r]
and the per-token gate G [T, E·r] is w expanded over each expert's rank block, so the shrink of every expert is
one GEMM and the expand one GEMM of the routing-gated H; the router's gradient flows through dG = dZ ⊙ H.
No Python loop over experts runs in the forward or backward.

Load balance [code: transformers Mixtral ``load_balancing_loss_func``, the Switch loss for top-k]:
    aux = E · Σ_e f_e · P_e,  f_e = (tokens routing to e among their top-k) / T,  P_e = mean_t p_{t,e}
computed in the forward when ``load_balance_coef`` > 0 and kept, scaled by the coefficient, in
``self.aux_loss``; :func:`moe_aux_loss` sums it over a model. Coefficient 0.001 in MoLA, off by default.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from lora_kernels.gated_lora import lora_linear
from lora_kernels.gated_lora.op import check_tensor

from .config import check_adapter_dtype, check_features, check_finite, check_rank


class MoELoRALinear(nn.Module):
    """Drop-in for ``nn.Linear``: frozen base plus ``num_experts`` rank-``r`` LoRA experts and a top-k router.

    Parameters: ``weight`` [N, K], ``bias`` [N] (frozen), ``router`` [E, K] (fp32), ``lora_A`` [E·r, K],
    ``lora_B`` [N, E·r].
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, r: int, alpha: float = 16.0,
                 dropout: float = 0.0, top_k: int | None = None, bias: bool = True, load_balance_coef: float = 0.0,
                 device=None, dtype=None, adapter_dtype=None, _base: nn.Linear | None = None):
        super().__init__()
        num_experts, r = check_rank("num_experts", num_experts), check_rank("r", r)
        in_features, out_features = check_features(in_features, out_features)
        alpha = check_finite("alpha", alpha, positive=True)
        dropout = check_finite("dropout", dropout, lo=0.0, hi=1.0)
        load_balance_coef = check_finite("load_balance_coef", load_balance_coef, lo=0.0)
        adapter_dtype = check_adapter_dtype(adapter_dtype)
        if top_k is None:
            top_k = 2 if num_experts > 1 else 1  # [code: AlphaLoRA expert_number.py]
        if isinstance(top_k, bool) or not hasattr(top_k, "__index__"):
            raise TypeError(f"top_k must be an int (or None), got {type(top_k).__name__} {top_k!r}")
        top_k = int(top_k)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.r, self.top_k = num_experts, r, top_k
        self.lora_alpha = float(alpha)
        self.scaling = self.lora_alpha / r
        self.dropout = float(dropout)
        self.load_balance_coef = float(load_balance_coef)
        factory = {"device": device, "dtype": dtype}
        if _base is not None:
            self.weight, self.bias = _base.weight, _base.bias
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
            self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if self.weight.dtype in (torch.float16, torch.bfloat16) else self.weight.dtype
        dev = self.weight.device
        self.router = nn.Parameter(torch.empty(num_experts, in_features, device=dev, dtype=torch.float32))
        self.lora_A = nn.Parameter(torch.empty(num_experts * r, in_features, device=dev, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, num_experts * r, device=dev, dtype=adapter_dtype))
        self.aux_loss: torch.Tensor | None = None
        self.reset_parameters()

    def __getstate__(self):
        # aux_loss is the last forward's graph node: per-forward, and deepcopy refuses non-leaf tensors
        state = super().__getstate__()
        state["aux_loss"] = None
        return state

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Each expert's A gets the nn.Linear/PEFT init of an [r, K] matrix; B = 0 so the layer starts as the base.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_experts: int, r: int, alpha: float = 16.0, dropout: float = 0.0,
                    top_k: int | None = None, load_balance_coef: float = 0.0, adapter_dtype=None) -> "MoELoRALinear":
        """Wraps an existing ``nn.Linear`` (weight and bias taken by reference and frozen)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(linear.in_features, linear.out_features, num_experts, r, alpha, dropout, top_k,
                   bias=linear.bias is not None, load_balance_coef=load_balance_coef, adapter_dtype=adapter_dtype,
                   _base=linear)

    def routing(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x2 [T, K] → (dense top-k weights w [T, E] fp32, probabilities p [T, E] fp32, top-k indices [T, k])."""
        rd = torch.promote_types(self.router.dtype, torch.float32)  # fp32 at least (fp64 for gradcheck)
        logits = x2.to(rd) @ self.router.to(rd).t()                                        # [T, E]
        p = torch.softmax(logits, dim=-1)
        val, idx = torch.topk(p, self.top_k, dim=-1)                                      # [T, k]
        val = val / val.sum(-1, keepdim=True)
        w = torch.zeros_like(p).scatter(1, idx, val)                                       # [T, E]
        return w, p, idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x)   # before the router reads x (a clear TypeError, not an AttributeError)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [..., in_features={self.in_features}], got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(math.prod(lead), self.in_features)   # [T, K]; explicit T: reshape(-1, 0) is ambiguous
        w, p, idx = self.routing(x2)
        gate = w.repeat_interleave(self.r, dim=1)                                          # [T, E·r]
        if self.load_balance_coef > 0 and self.training and x2.shape[0] > 0:
            counts = torch.zeros_like(p).scatter_add_(1, idx, torch.ones_like(idx, dtype=p.dtype))
            f = counts.mean(0)                                                             # [E]
            self.aux_loss = self.load_balance_coef * self.num_experts * (f * p.mean(0)).sum()
        else:
            self.aux_loss = None
        y = lora_linear(x2, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, gate,
                        self.dropout, self.training)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, experts={self.num_experts}, "
                f"r={self.r}, top_k={self.top_k}, alpha={self.lora_alpha}, dropout={self.dropout}, "
                f"load_balance_coef={self.load_balance_coef}")


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the load-balance losses the MoE layers stored in their last training forward (None if none)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoELoRALinear) and m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def apply_moe_adapters(model: nn.Module, target_modules: Sequence[str] | str, experts_per_layer: Sequence[int] | dict,
                       r: int, alpha: float, dropout: float = 0.0, top_k: Sequence[int] | dict | int | None = None,
                       load_balance_coef: float = 0.0,
                       modules_to_save: Sequence[str] | None = None) -> dict[str, MoELoRALinear]:
    """Replaces target ``nn.Linear`` modules inside numbered blocks with :class:`MoELoRALinear` and freezes every
    base parameter (only routers, experts and ``modules_to_save`` train). All or nothing: on any error the model is
    left exactly as it was.

    Args:
        model: a model with numbered blocks (``model.layers.3.``, ``encoder.layer.3.``). The targets must lie in
            one stack of blocks: an encoder-decoder's ``encoder.layers.i`` and ``decoder.layers.i`` would share
            block i's count, so targets in both are refused (name one stack, e.g. with a regex).
        target_modules: names or suffixes (e.g. ["q_proj", "v_proj"] or ["query", "value"]), or one regex.
        experts_per_layer: experts per block index, as a list (index = block) or a dict {block: n}. A block with
            0 experts keeps its plain frozen linears; experts for a block no target reaches are refused.
        r, alpha, dropout: each expert's rank, LoRA alpha (scale alpha/r) and input dropout.
        top_k: None (2 if the block has > 1 expert else 1), one int, or per block (list/dict).
        load_balance_coef: coefficient of the Switch load-balance loss (0 = off).
        modules_to_save: names or suffixes of modules kept trainable (a task head such as ``"classifier"``).
    Returns:
        {module name: the new MoELoRALinear}.
    """
    from .config import _names
    from .surgery import (CONFIG_ATTR, check_one_stack, check_save_overlap, find_modules, layer_index, refuse_adapted,
                          replace_modules)

    target_modules = _names("target_modules", target_modules, allow_regex=True)
    modules_to_save = _names("modules_to_save", modules_to_save or [], allow_regex=False)

    r = check_rank("r", r)
    alpha = check_finite("alpha", alpha, positive=True)
    dropout = check_finite("dropout", dropout, lo=0.0, hi=1.0)
    check_finite("load_balance_coef", load_balance_coef, lo=0.0)

    def per_block(v, what):
        # a sequence (list, tuple, range, numpy array, 1-d tensor) is one entry per block; a dict maps blocks
        if isinstance(v, dict):
            # block indices as ints; a dict read back from JSON has them as strings ("0"): taken as the same block
            bad = [k for k in v if not (isinstance(k, str) and k.strip().isdigit())
                   and (isinstance(k, bool) or not hasattr(k, "__index__"))]
            if bad:
                raise TypeError(f"{what}: a dict maps block indices (ints) to values; got key {bad[0]!r}")
            out = {}
            for k, x in v.items():
                i = int(k) if isinstance(k, str) else int(k.__index__())
                if i in out:
                    raise ValueError(f"{what}: block {i} is given twice ({k!r})")
                out[i] = x
            return out
        if v is None or isinstance(v, (str, bytes)) or not hasattr(v, "__len__"):
            return v
        return list(v.tolist() if hasattr(v, "tolist") else v)

    experts_per_layer, top_k = per_block(experts_per_layer, "experts_per_layer"), per_block(top_k, "top_k")

    def per_layer(v, li, what):
        if isinstance(v, dict):
            if li not in v:
                raise ValueError(f"{what} has no entry for block {li}")
            return v[li]
        if not isinstance(v, list):
            return v   # one value for every block (checked by the caller)
        if li >= len(v):
            raise ValueError(f"{what} has {len(v)} entries but the model has block {li}")
        return v[li]

    refuse_adapted(model, "apply_moe_adapters")
    found = find_modules(model, target_modules)
    outside = [n for n in found if layer_index(n) is None]
    names = [n for n in found if layer_index(n) is not None]
    if outside and names:   # experts are counted per block: a suffix that also matches a pooler or head is skipped
        warnings.warn(f"apply_moe_adapters: target_modules={target_modules!r} also matches {outside[:4]} outside the "
                      "numbered blocks; MoE-LoRA experts are allocated per block, so these get no adapter",
                      stacklevel=2)
    if not names:
        raise ValueError(f"no nn.Linear inside numbered blocks matches target_modules={target_modules!r}")
    check_one_stack(names, "apply_moe_adapters")
    reached = sorted({layer_index(n) for n in names})
    given = (experts_per_layer.items() if isinstance(experts_per_layer, dict) else
             enumerate(experts_per_layer) if isinstance(experts_per_layer, list) else ())
    extra = {b: e for b, e in given if b not in reached and e != 0}
    if extra:   # experts for blocks no target reaches would be dropped in silence
        raise ValueError(f"experts_per_layer gives experts {extra} to blocks no target reaches (targeted blocks: "
                         f"{reached}); give those blocks 0 experts or target them")
    save = find_modules(model, list(modules_to_save), "modules_to_save", nn.Module) if modules_to_save else []
    check_save_overlap(save, names, model)

    def build(name: str, lin: nn.Linear) -> MoELoRALinear | None:
        li = layer_index(name)
        e = per_layer(experts_per_layer, li, "experts_per_layer")
        if isinstance(e, bool) or not hasattr(e, "__index__") or int(e) < 0:
            raise ValueError(f"experts_per_layer for block {li} must be an int >= 0, got {e!r}")
        if int(e) == 0:
            return None
        k = per_layer(top_k, li, "top_k")
        if k is not None and (isinstance(k, bool) or not hasattr(k, "__index__")):
            raise TypeError(f"top_k must be an int >= 1 or None (block {li}), got {k!r}")
        try:
            return MoELoRALinear.from_linear(lin, int(e), r, alpha, dropout, k, load_balance_coef).train(lin.training)
        except (TypeError, ValueError) as err:
            raise type(err)(f"module {name!r}: {err}") from None

    def unfreeze_heads():
        for n in save:
            for p in model.get_submodule(n).parameters():
                p.requires_grad_(True)

    def after():
        if not any(isinstance(model.get_submodule(n), MoELoRALinear) for n in names):
            raise ValueError(f"experts_per_layer gives 0 experts to every targeted block ({experts_per_layer!r}): "
                             "nothing would train")
        unfreeze_heads()

    out = replace_modules(model, names, build, after=after, freeze=True)
    setattr(model, CONFIG_ATTR, {"method": "moe_lora", "modules_to_save": list(modules_to_save or []),
                                 "adapted_modules": list(out)})
    return out
