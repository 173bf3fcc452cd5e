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
  repair runs as published, then lifts layers below m, taking from the layers most above their quota. Default 1
  (``DEFAULT_MIN_EXPERTS``: a MoE layer needs an expert); 0 is the published behaviour.
- degenerate input [ours]: low-rank or near-constant spectra are flagged by module name and left out (see
  :func:`layer_alphas`); the expert weights are normalised in the log domain (see :func:`allocate_experts`).
- MoLA baselines [paper: MoLA]: "2468" gives 2, 4, 6, 8 experts per quarter of depth (exactly 2/4/6/8 at L = 32,
  T = 160); at other (L, T) the 2:4:6:8 weights are scaled to T by largest remainder [ours]. "uniform": T // L
  each, the remainder to the first layers [ours].
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet

import numpy as np
import torch
from torch import nn

from lora_kernels.spectra import alpha as _alpha

from ..surgery import check_one_stack, layer_index, matches

XMIN_MODES = _alpha.XMIN_MODES
def target_linears(model: nn.Module, target_modules: Sequence[str] | None = None) -> list[tuple[str, int, nn.Linear]]:
    """``(name, layer index, module)`` for every nn.Linear inside a numbered block whose name ends with one of
    ``target_modules`` (suffix match on dotted names, e.g. "q_proj", "attention.output.dense"; None = all). An
    adapter layer (LoRALinear, MoELoRALinear) counts with its frozen base weight; a merged one is refused."""
    from ..layers import LoRALinear
    from ..moe import MoELoRALinear
    out = []
    for name, mod in model.named_modules():
        if target_modules is not None and not matches(name, target_modules):
            continue
        if isinstance(mod, (LoRALinear, MoELoRALinear)):
            # an adapted layer: its frozen base weight is the pretrained matrix AlphaLoRA reads, unless merged
            if getattr(mod, "merged", False):
                raise ValueError(f"{name} is a merged adapter layer: its weight holds the adapter's update, not the "
                                 "pretrained matrix; unmerge() it before computing layer alphas")
        elif not isinstance(mod, nn.Linear):
            continue
        li = layer_index(name)
        if li is not None:
            out.append((name, li, mod))
    check_one_stack([n for n, _, _ in out], "target_linears")
    return out


def alpha_hill(eigenvalues: torch.Tensor | np.ndarray | Sequence[float], xmin: str = "faithful",
               threshold: float = 0.0, *, eps: float | None = None, name: str | None = None) -> float:
    """PL_Alpha_Hill of one spectrum.

    Args:
        eigenvalues: [n] eigenvalues λ = σ² (any order; sorted here), finite, n ≥ 2.
        xmin: "faithful" | "corrected" | "median" | "scan" (see :mod:`lora_kernels.spectra.alpha`).
        threshold: eigenvalues ≤ threshold are ignored (weightwatcher uses 1e-5; AlphaLoRA 0).
        eps: machine epsilon of the matrix the eigenvalues came from (default: float32's), for the
            degenerate-spectrum test.
        name: the matrix's name, used in the warning.
    Returns:
        α as a float. A degenerate spectrum (fewer than 2 eigenvalues above the round-off floor or ``threshold``,
        or a near-constant one: see :mod:`lora_kernels.spectra.alpha`) has no power law: NaN and a RuntimeWarning.
        Otherwise, when no candidate has α > 1: the published loop's value (0.0) in faithful mode, NaN and a
        RuntimeWarning otherwise.
    """
    if isinstance(eigenvalues, (str, bytes)) or eigenvalues is None:
        raise TypeError(f"eigenvalues must be a tensor, array or sequence of floats, got {type(eigenvalues).__name__}")
    lam = torch.as_tensor(eigenvalues)
    if lam.dim() != 1:
        raise ValueError(f"eigenvalues must be 1-D [n], got shape {tuple(lam.shape)}")
    if lam.numel() < 2:
        raise ValueError(f"eigenvalues needs at least 2 values, got {lam.numel()}")
    if lam.dtype == torch.bool or lam.is_complex():
        raise TypeError(f"eigenvalues must be real numbers, got dtype {lam.dtype}")
    if not lam.is_floating_point():
        lam = lam.to(torch.float64)
    if lam.dtype not in (torch.float32, torch.float64):
        lam = lam.to(torch.float32)
    if not bool(torch.isfinite(lam).all()):
        raise ValueError("eigenvalues contain NaN or Inf")
    # λ = σ² ≥ 0; an eigensolver's round-off may leave a tiny negative (ignored like any λ ≤ threshold), a clearly
    # negative value means the input is not σ² (e.g. a signed weight's eigenvalues, or σ instead of σ²… with a sign)
    # the tolerance follows the precision the eigenvalues were computed in (eps), not only the one they arrive in
    # (a malformed eps is left to hill_fit, whose error names it)
    ok_eps = isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0.0 < eps < 1.0
    tol = math.sqrt(max(float(eps) if ok_eps else torch.finfo(torch.float32).eps, torch.finfo(lam.dtype).eps))
    low = float(lam.min())
    if low < -tol * float(lam.abs().max()):
        raise ValueError(f"eigenvalues must be λ = σ² ≥ 0 (up to round-off), got {low:g} for {_what(name)}")
    res = _alpha.hill_fit(lam.sort().values.unsqueeze(0), xmin=xmin, threshold=threshold, eps=eps)
    if bool(res["degenerate"][0]):
        warnings.warn(f"alpha_hill: {_what(name)} has a degenerate spectrum (low rank or near-constant "
                      "eigenvalues): no power law, alpha is NaN", RuntimeWarning, stacklevel=2)
        return math.nan
    if not bool(res["ok"][0]) and xmin != "faithful":
        warnings.warn(f"alpha_hill: no x_min candidate of {_what(name)} has a tail to fit (xmin={xmin!r}): alpha is "
                      "NaN", RuntimeWarning, stacklevel=2)
        return math.nan
    return float(res["alpha"][0])


def _what(name: str | None) -> str:
    return "the spectrum" if name is None else repr(name)


@torch.no_grad()
def layer_alphas(model: nn.Module, target_modules: Sequence[str] | None = None, xmin: str = "faithful",
                 method: str = "gram", dtype: torch.dtype = torch.float64, device=None, threshold: float = 0.0,
                 return_matrix_alphas: bool = False, return_degenerate: bool = False, lapack: str = "auto"):
    """Per-layer α: the mean α of each numbered block's target matrices, ordered by block index.

    Args:
        model: any module with numbered blocks (HF decoders ``model.layers.i``, BERT ``encoder.layer.i``).
        target_modules: name suffixes to include (default: every nn.Linear inside the blocks).
        xmin, threshold: see :func:`alpha_hill`. method, dtype, device, lapack: see
            :func:`lora_kernels.spectra.alpha.eigenvalues` ("auto": NumPy's LAPACK on CPU, "torch": the reference).
        return_matrix_alphas: also return ``{module name: α}`` (NaN for a degenerate matrix).
        return_degenerate: also return ``{module name: reason}`` of the degenerate matrices.
    Returns:
        list[float] with one α per block (index i = block i); with ``return_matrix_alphas`` and/or
        ``return_degenerate`` a tuple ``(list, dict[, dict])`` in that order.

    Degenerate matrices [ours] (low rank or near-constant spectrum, e.g. an orthogonal or rank-1 weight: see
    :mod:`lora_kernels.spectra.alpha`) have no power law. They are named in a RuntimeWarning and left out of their
    layer's mean; a layer whose every matrix is degenerate gets the largest α of the other layers (a flat
    spectrum is the α → ∞ end of the scale, clamped to the largest measured value). If every matrix is
    degenerate a ValueError names them. A non-finite or empty weight is a ValueError naming its module.
    """
    found = target_linears(model, target_modules)
    if not found:
        raise ValueError(f"no nn.Linear (or adapter layer) inside numbered blocks matches "
                         f"target_modules={target_modules!r}")
    # Empty, non-float and non-finite weights are ValueErrors/TypeErrors naming the module, raised by the kernel
    # (non-finite ones found on the Gram diagonal: no separate pass over every weight).
    a, deg = _alpha.alphas_of([m.weight for _, _, m in found], xmin=xmin, method=method, dtype=dtype,
                              device=device, threshold=threshold, return_degenerate=True, lapack=lapack,
                              names=[f"layer_alphas: {name}.weight" for name, _, _ in found])
    reasons = {name: "no power-law fit (low rank or near-constant spectrum, or no x_min candidate to fit)"
               for (name, _, _), d in zip(found, deg.tolist()) if d}
    if len(reasons) == len(found):
        raise ValueError(f"layer_alphas: every target matrix has a degenerate spectrum (no power law): "
                         f"{sorted(reasons)}")
    if reasons:
        warnings.warn(f"layer_alphas: {len(reasons)} matrices have a degenerate spectrum (low rank or near-constant "
                      f"eigenvalues) and are left out of their layer's mean: {sorted(reasons)}", RuntimeWarning,
                      stacklevel=3)
    per: dict[int, list[float]] = {}
    for (_, li, _), v in zip(found, a.tolist()):
        per.setdefault(li, []).append(v)
    layers = sorted(per)
    if layers != list(range(len(layers))):
        raise ValueError(f"block indices are not contiguous from 0: {layers}")
    means = {i: float(np.mean([v for v in per[i] if not math.isnan(v)])) for i in layers
             if any(not math.isnan(v) for v in per[i])}
    top = max(means.values())
    clamped = [i for i in layers if i not in means]
    if clamped:
        warnings.warn(f"layer_alphas: every matrix of layer(s) {clamped} is degenerate; they get the largest layer "
                      f"alpha of the others ({top:.4g})", RuntimeWarning, stacklevel=3)
    out = [means.get(i, top) for i in layers]
    extra = []
    if return_matrix_alphas:
        extra.append({name: v for (name, _, _), v in zip(found, a.tolist())})
    if return_degenerate:
        extra.append(reasons)
    return (out, *extra) if extra else out


MAX_TOTAL = 2 ** 50     # quotas are float64: integer counts stay exact (and the repairs short) below this
DEFAULT_MIN_EXPERTS = 1  # MoELoRALinear needs ≥ 1 expert; the single default (the CLI and the demo read it)


def _largest_remainder(quota: np.ndarray, total: int) -> np.ndarray:
    n = np.floor(quota).astype(np.int64)
    left = int(total - n.sum())   # in [0, L) up to float64 round-off of Σ quota (|error| ≪ 1 below MAX_TOTAL)
    order = np.argsort(-(quota - n), kind="stable")  # ties: earlier layer first
    if left >= 0:
        n += left // n.size
        n[order[: left % n.size]] += 1
    else:  # Σ floor overshot by round-off: take back from the smallest remainders of non-empty layers
        for i in order[::-1]:
            if left == 0:
                break
            if n[i] > 0:
                n[i] -= 1
                left += 1
    return n


def _faithful(s: np.ndarray, total: int) -> np.ndarray:
    n = np.round(s / s.sum() * total).astype(np.int64)
    # Each pass moves Σn one step toward T, so this ends after |Σ round(quota) − T| ≤ L passes.
    while n.sum() != total:
        if total > n.sum():
            n[np.argmin(s - n)] += 1
        else:  # [ours] the published loop may take from an empty layer (n = −1); only non-empty ones give
            n[np.argmax(np.where(n > 0, s - n, -np.inf))] -= 1
    return n


def _count(x, name: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__} {x!r}")
    if x < 0:
        raise ValueError(f"{name} must be a non-negative int, got {x!r}")
    return int(x)


def allocate_experts(alphas: Sequence[float], total: int, beta: float = 2.5, repair: str = "faithful",
                     min_experts: int = DEFAULT_MIN_EXPERTS) -> list[int]:
    """Experts per layer ``n_l`` from layer alphas: ``s_l = α_l^β``, ``n_l ≈ T·s_l/Σs`` with ``Σ n_l = T``.

    Args:
        alphas: [L] layer alphas (finite, > 0).
        total: T, the total number of experts (a Python or NumPy int, ≤ ``MAX_TOTAL``).
        beta: exponent β (finite).
        repair: "faithful" (the published loop) or "largest_remainder".
        min_experts: lower bound m on every n_l (needs T ≥ L·m; default ``DEFAULT_MIN_EXPERTS`` = 1, since a
            MoE-LoRA layer needs an expert).
    Returns:
        list[int] of length L, each ≥ ``min_experts``, summing to T.

    The weights are normalised in the log domain [ours]: ``w_l = exp(β ln α_l − max_k β ln α_k) / Σ``, so α^β
    may overflow or underflow (large β, tiny α) without NaN counts. The faithful repair compares the
    unnormalised ``s_l = α_l^β`` with the counts, as published, whenever every s_l is a normal float64; otherwise
    (overflow or underflow) it compares ``T·w_l``. It never takes an expert from an empty layer [ours]. Both
    repairs end after at most L + L·m steps. Errors: TypeError for a wrong type, ValueError for a wrong value,
    each naming the argument.
    """
    if isinstance(alphas, (str, bytes)) or not hasattr(alphas, "__len__"):
        raise TypeError(f"alphas must be a sequence of floats, got {type(alphas).__name__}")
    if isinstance(alphas, (Mapping, AbstractSet)):   # iterating a dict gives its keys: they would be the alphas
        raise TypeError(f"alphas must be a sequence of floats in layer order, got a {type(alphas).__name__} (pass "
                        "[d[layer] for layer in sorted(d)] for a dict keyed by layer)")
    try:
        a = np.asarray([float(x) for x in alphas], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"alphas must be a sequence of real numbers: {e}") from None
    L = a.shape[0]
    if L == 0:
        raise ValueError("alphas is empty")
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        bad = [i for i, v in enumerate(a.tolist()) if not (math.isfinite(v) and v > 0)]
        raise ValueError(f"alphas must be finite and > 0; layers {bad[:10]} are {a[bad[:10]].tolist()}")
    total = _count(total, "total")
    min_experts = _count(min_experts, "min_experts")
    if total > MAX_TOTAL:
        raise ValueError(f"total must be <= 2**50, got {total}")
    if total < L * min_experts:
        raise ValueError(f"total={total} < layers ({L}) × min_experts ({min_experts})")
    if isinstance(beta, (bool, np.bool_)) or not isinstance(beta, (int, float, np.integer, np.floating)):
        raise TypeError(f"beta must be a real number, got {type(beta).__name__}")
    if not math.isfinite(float(beta)):
        raise ValueError(f"beta must be finite, got {beta}")
    if repair not in ("faithful", "largest_remainder"):
        raise ValueError(f"repair must be 'faithful' or 'largest_remainder', got {repair!r}")
    logw = float(beta) * np.log(a)
    if not np.all(np.isfinite(logw)):
        raise ValueError(f"beta={beta} too large: beta·ln(alpha) overflows float64")
    w = np.exp(logw - logw.max())
    w /= w.sum()                                         # Σ ≥ 1 before the division: no 0/0
    if total == 0:                                       # (then m = 0) nothing to share; the repairs divide by T
        return [0] * L
    quota = w * total
    if repair == "largest_remainder":
        n = min_experts + _largest_remainder(w * (total - L * min_experts), total - L * min_experts)
    else:
        with np.errstate(over="ignore", under="ignore"):
            s = a ** float(beta)
        if not (np.all(np.isfinite(s)) and np.all(s >= np.finfo(np.float64).tiny)):
            s = quota                                    # α^β not representable: the log-domain weights
        n = _faithful(s, total)
        # Each pass lifts the emptiest layer by one from a layer above m (one exists: T ≥ L·m): ≤ L·m passes.
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
