"""AlphaLoRA: training-free expert allocation for MoE-LoRA from layer quality (ALGORITHMS.md §5).

    λ = σ(W)² of every target matrix  →  α per matrix (PL_Alpha_Hill)  →  α_l = mean over layer l's matrices
    s_l = α_l^β  →  n_l = round(T · s_l / Σ s), repaired to Σ n_l = T  →  top-k_l = 2 if n_l > 1 else 1

Provenance of each choice ([paper] AlphaLoRA, [code] peijunallin/alphalora ``expert_number.py`` and weightwatcher
0.7.7 ``fit_powerlaw``, [ours] where neither says):
- targets: every ``nn.Linear`` inside a numbered block (``model.layers.3.``, ``encoder.layer.3.``, ``h.3.``) [code:
  find_layers on each decoder layer]; embeddings and heads are outside the blocks, so they are skipped [paper].
- eigenvalues unnormalised, fp64 Gram spectrum by default [ours; the code uses fp32 svdvals — same values to
  ~1e-7 relative, see lora_kernels.alpha]; zeros not filtered beyond λ > 0 [code: filter_zeros=False].
- x_min window, faithful mode: [code] (see :mod:`lora_kernels.alpha` for all four modes).
- layer alpha = arithmetic mean of its matrices' alphas [code].
- β = 2.5, T = 160 for 32 layers [code defaults]; rounding with round-half-to-even [code: np.round].
- faithful repair [code: exponential_scaling]: while Σn ≠ T, add 1 at argmin(s − n) or remove 1 at argmax(s − n),
  comparing the UNNORMALISED s_l = α_l^β with the counts n_l (first index on ties).
- largest-remainder repair [ours]: floor of the quotas T·s_l/Σs, the leftover to the largest fractional parts.
- ``min_experts`` m [ours]: largest remainder gives m to each layer and shares T − L·m by the quotas; faithful
  repair runs as published, then lifts layers below m, taking from the layers most above their quota.
- MoLA baselines [paper: MoLA]: "2468" gives 2, 4, 6, 8 experts per quarter of depth (exactly 2/4/6/8 at L = 32,
  T = 160); at other (L, T) the 2:4:6:8 weights are scaled to T by largest remainder [ours]. "uniform": T // L
  each, the remainder to the first layers [ours].
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lora_kernels.spectra import alpha as _alpha

from ..surgery import layer_index, matches

XMIN_MODES = _alpha.XMIN_MODES
def target_linears(model: nn.Module, target_modules: Sequence[str] | None = None) -> list[tuple[str, int, nn.Linear]]:
    """``(name, layer index, module)`` for every nn.Linear inside a numbered block whose name ends with one of
    ``target_modules`` (suffix match on dotted names, e.g. "q_proj", "attention.output.dense"; None = all)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (target_modules is None or matches(name, target_modules)):
            li = layer_index(name)
            if li is not None:
                out.append((name, li, mod))
    return out


def alpha_hill(eigenvalues: torch.Tensor | np.ndarray | Sequence[float], xmin: str = "faithful",
               threshold: float = 0.0) -> float:
    """PL_Alpha_Hill of one spectrum.

    Args:
        eigenvalues: [n] eigenvalues λ = σ² (any order; sorted here), n ≥ 2 above ``threshold``.
        xmin: "faithful" | "corrected" | "median" | "scan" (see :mod:`lora_kernels.alpha`).
        threshold: eigenvalues ≤ threshold are ignored (weightwatcher uses 1e-5; AlphaLoRA 0).
    Returns:
        α as a float. When no candidate has α > 1: the published loop's value (0.0) in faithful mode, NaN otherwise.
    """
    lam = torch.as_tensor(eigenvalues)
    if lam.dim() != 1:
        raise ValueError(f"eigenvalues must be 1-D [n], got shape {tuple(lam.shape)}")
    if not lam.is_floating_point():
        lam = lam.to(torch.float64)
    if lam.dtype not in (torch.float32, torch.float64):
        lam = lam.to(torch.float32)
    if not bool(torch.isfinite(lam).all()):
        raise ValueError("eigenvalues contain NaN or Inf")
    res = _alpha.hill_fit(lam.sort().values.unsqueeze(0), xmin=xmin, threshold=threshold)
    if not bool(res["ok"][0]) and xmin != "faithful":
        return math.nan
    return float(res["alpha"][0])


@torch.no_grad()
def layer_alphas(model: nn.Module, target_modules: Sequence[str] | None = None, xmin: str = "faithful",
                 method: str = "gram", dtype: torch.dtype = torch.float64, device=None, threshold: float = 0.0,
                 return_matrix_alphas: bool = False):
    """Per-layer α: the mean α of each numbered block's target matrices, ordered by block index.

    Args:
        model: any module with numbered blocks (HF decoders ``model.layers.i``, BERT ``encoder.layer.i``).
        target_modules: name suffixes to include (default: every nn.Linear inside the blocks).
        xmin, threshold: see :func:`alpha_hill`. method, dtype, device: see :func:`lora_kernels.alpha.eigenvalues`.
        return_matrix_alphas: also return ``{module name: α}``.
    Returns:
        list[float] with one α per block (index i = block i); with ``return_matrix_alphas`` a tuple
        ``(list, dict)``.
    """
    found = target_linears(model, target_modules)
    if not found:
        raise ValueError(f"no nn.Linear inside numbered blocks matches target_modules={target_modules!r}")
    a = _alpha.alphas_of([m.weight for _, _, m in found], xmin=xmin, method=method, dtype=dtype, device=device,
                         threshold=threshold)
    per: dict[int, list[float]] = {}
    for (_, li, _), v in zip(found, a.tolist()):
        per.setdefault(li, []).append(v)
    layers = sorted(per)
    if layers != list(range(len(layers))):
        raise ValueError(f"block indices are not contiguous from 0: {layers}")
    out = [float(np.mean(per[i])) for i in layers]
    if return_matrix_alphas:
        return out, {name: v for (name, _, _), v in zip(found, a.tolist())}
    return out


def _largest_remainder(quota: np.ndarray, total: int) -> np.ndarray:
    n = np.floor(quota).astype(np.int64)
    left = int(total - n.sum())
    if left > 0:
        order = np.argsort(-(quota - n), kind="stable")  # ties: earlier layer first
        n[order[:left]] += 1
    return n


def _faithful(s: np.ndarray, total: int) -> np.ndarray:
    n = np.round(s / s.sum() * total).astype(np.int64)
    while n.sum() != total:
        if total > n.sum():
            n[np.argmin(s - n)] += 1
        else:
            n[np.argmax(s - n)] -= 1
    return n


def allocate_experts(alphas: Sequence[float], total: int, beta: float = 2.5, repair: str = "faithful",
                     min_experts: int = 0) -> list[int]:
    """Experts per layer ``n_l`` from layer alphas: ``s_l = α_l^β``, ``n_l ≈ T·s_l/Σs`` with ``Σ n_l = T``.

    Args:
        alphas: [L] layer alphas (> 0).
        total: T, the total number of experts.
        beta: exponent β.
        repair: "faithful" (the published loop) or "largest_remainder".
        min_experts: lower bound m on every n_l (needs T ≥ L·m).
    Returns:
        list[int] of length L summing to T.
    """
    a = np.asarray([float(x) for x in alphas], dtype=np.float64)
    L = a.shape[0]
    if L == 0:
        raise ValueError("alphas is empty")
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"alphas must be finite and > 0, got {a.tolist()}")
    if not isinstance(total, (int, np.integer)) or total < 0:
        raise ValueError(f"total must be a non-negative int, got {total!r}")
    if not isinstance(min_experts, (int, np.integer)) or min_experts < 0:
        raise ValueError(f"min_experts must be a non-negative int, got {min_experts!r}")
    if total < L * min_experts:
        raise ValueError(f"total={total} < layers ({L}) × min_experts ({min_experts})")
    if repair not in ("faithful", "largest_remainder"):
        raise ValueError(f"repair must be 'faithful' or 'largest_remainder', got {repair!r}")
    s = a ** float(beta)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"alpha**beta overflows for beta={beta}")
    quota = s / s.sum() * total
    if repair == "largest_remainder":
        n = min_experts + _largest_remainder(s / s.sum() * (total - L * min_experts), total - L * min_experts)
    else:
        n = _faithful(s, total)
        while (n < min_experts).any():
            low = int(np.argmin(n))
            donors = np.where(n > min_experts, n - quota, -np.inf)
            n[int(np.argmax(donors))] -= 1
            n[low] += 1
    return [int(v) for v in n]


def top_k_for(experts: Sequence[int]) -> list[int]:
    """Router top-k per layer [code]: 2 if the layer has more than one expert, else 1."""
    return [2 if int(e) > 1 else 1 for e in experts]


def mola_experts(num_layers: int, total: int, pattern: str = "2468") -> list[int]:
    """MoLA baselines with the same total T: "2468" (2:4:6:8 per quarter of depth) or "uniform"."""
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if not isinstance(total, int) or total < 0:
        raise ValueError(f"total must be a non-negative int, got {total!r}")
    if pattern == "uniform":
        w = np.ones(num_layers)
    elif pattern == "2468":
        w = np.array([(2, 4, 6, 8)[(4 * i) // num_layers] for i in range(num_layers)], dtype=np.float64)
    else:
        raise ValueError(f"pattern must be '2468' or 'uniform', got {pattern!r}")
    return [int(v) for v in _largest_remainder(w / w.sum() * total, total)]
