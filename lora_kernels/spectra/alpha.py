"""Batched eigenvalue spectra and vectorised power-law (Hill) fits: the kernels behind AlphaLoRA (ALGORITHMS.md §5).

Shape legend:
    B  matrices in one batch (all of one shape)     n  eigenvalues per matrix (min(N, K))
    C  candidate x_min values scanned at once

Eigenvalues ``λ = σ(W)²`` of every matrix of one shape come from ONE batched call:
    method="gram": ``eigvalsh`` of the smaller Gram matrix (W Wᵀ or Wᵀ W) in fp64. On CPU this is ~3× cheaper
        than an SVD (a symmetric tridiagonal reduction instead of a bidiagonal one plus no vectors), and fp64
        keeps the squared condition number harmless: the absolute error is ~1e-16·λ_max, below the fp32
        rounding of the weights themselves.
    method="svd": ``torch.linalg.svdvals`` on the stack, then squared (what AlphaLoRA's code does).
Backend (``lapack``) of the gram method on CPU: "numpy" (the default there) runs the Gram product and the batched
    ``eigvalsh`` through NumPy's BLAS/LAPACK (OpenBLAS in the NumPy wheels): the same dsyevd on the same fp64 Gram,
    measured 1.3× (eigvalsh) and 1.7× (Gram product) faster than torch's MKL on one AMD EPYC core, eigenvalues
    equal to ~1e-15·λ_max. "torch" is the readable reference (torch.linalg only; the only backend off CPU).
    NumPy's BLAS threads follow its own settings (OPENBLAS_NUM_THREADS, the CPU affinity), not torch's.
Non-finite input is caught on the Gram diagonal (Σ w² is NaN/Inf iff a row holds NaN/Inf, or overflows): one
    O(B·n) check per shape instead of a pass over every weight; only then are the matrices scanned to name the first.

``hill_fit`` scans every candidate x_min of every matrix at once: for candidate index i with tail size m = n − i
    α_i = 1 + m / Σ_{j≥i} ln(λ_j / λ_i)
    D_i = max_{k<m} |1 − (λ_{i+k} / λ_i)^{1−α_i} − k/m|           (KS distance, empirical CDF k/m)
and keeps the α of the smallest D (first index on ties). Candidates with α_i ≤ 1 keep D = 1 and α = 0, as in
AlphaLoRA's and weightwatcher's loops. The suffix sums are one ``cumsum``; the KS maximum is computed on
[B, C, n] tiles of bounded size, so memory stays O(B·C·n) and nothing loops over matrices in Python.

Which candidates are scanned (``xmin`` mode):
    faithful   [code: peijunallin/alphalora fix_finger, inherited from weightwatcher xmin_peak] histogram of log10 λ
               with 100 equal bins over [min, max]; peak = 10^(left edge of the fullest bin, first on ties);
               candidates λ_i with log10(0.95·peak) ≤ λ_i ≤ 1.5·peak. The lower bound compares a log10 value with
               a linear one (the mix-up of the published code, kept on purpose); since log10(0.95p) < p it
               usually admits every eigenvalue below the peak.
    corrected  [ours] the same window with the lower bound 0.95·peak in linear units.
    median     [code: TempBalance 'xmin_mid', xmin_pos=2] the single candidate i = n // 2.
    scan       [paper: Clauset et al.; code: weightwatcher WWFit] every candidate i < n − 1.
Non-positive eigenvalues (exact zeros of rank-deficient matrices) are dropped before the fit [ours: AlphaLoRA
would take log 0]; the optional ``threshold`` drops λ ≤ threshold as weightwatcher does (EVALS_THRESH = 1e-5).

Degenerate spectra [ours] have no power law to fit, and the fit of their round-off is meaningless (a fp32 orthogonal
matrix gets α ≈ 1e7, a fp32 rank-1 matrix an α fitted to λ₂/λ₁ ≈ 1e-16). With ε the machine epsilon of the
MATRIX the eigenvalues came from (``eps``; float32's by default) a row is degenerate when
    low rank:       fewer than ``MIN_EIGS`` eigenvalues above the round-off floor max(threshold, λ_max·max(ε², n·ε₆₄))
                    (rounding W to ε leaves singular values ~ε·σ_max, i.e. λ ~ ε²·λ_max: measured ≤ 0.02·ε²·λ_max
                    for rank-1 matrices in fp32/bf16/fp16; n·ε₆₄·λ_max is the fp64 Gram's own error), or
    near-constant:  (λ_max − λ_min) / λ_max ≤ ``FLAT_EPS``·ε over the eigenvalues above the floor (rounding an
                    orthogonal matrix spreads its λ by ≤ 1.2·ε, measured for n = 4..256 in fp32/bf16/fp16).
``hill_fit`` returns ``degenerate`` [B] (bool) and NaN alpha for such rows instead of a number.
"""
from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Sequence

import torch

XMIN_MODES = ("faithful", "corrected", "median", "scan")
HIST_BINS = 100
_TILE_ELEMS = 1 << 22  # elements per [B, C, n] KS tile (32 MiB in fp64)
_TILE_CANDIDATES = 32  # small tiles skip most of the lower triangle j < i
MIN_EIGS = 2          # eigenvalues above the round-off floor a fit needs (a tail of one point has no slope)
FLAT_EPS = 8.0        # near-constant: relative spread ≤ FLAT_EPS·ε (round-off spreads measured ≤ 1.2·ε)


def eigenvalues(mats: Sequence[torch.Tensor], method: str = "gram", dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None, lapack: str = "auto",
                names: Sequence[str] | None = None) -> list[torch.Tensor]:
    """Sorted (ascending) eigenvalues ``σ(W)²`` of each matrix, batched over equal shapes.

    Args:
        mats: 2-D tensors [N_i, K_i] (any float dtype, any device); never modified.
        method: "gram" (eigvalsh of the smaller Gram matrix) or "svd" (svdvals squared).
        dtype: compute dtype, torch.float32 or torch.float64.
        device: where to compute (default: each matrix's own device; pass "cuda" to use a GPU).
        lapack: backend of the gram method on CPU: "auto" (= "numpy" on CPU), "numpy" or "torch" (the reference;
            see the module docstring). Ignored by method="svd" and off CPU (always torch).
        names: labels of the matrices for error messages (default ``mats[i]``).
    Returns:
        list of [min(N_i, K_i)] tensors in ``dtype``, in the order of ``mats``.
    """
    if method not in ("gram", "svd"):
        raise ValueError(f"method must be 'gram' or 'svd', got {method!r}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if lapack not in ("auto", "numpy", "torch"):
        raise ValueError(f"lapack must be 'auto', 'numpy' or 'torch', got {lapack!r}")
    if names is not None and len(names) != len(mats):
        raise ValueError(f"names has {len(names)} entries for {len(mats)} matrices")
    label = (lambda i: f"mats[{i}]") if names is None else (lambda i: names[i])
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, w in enumerate(mats):
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"{label(i)} must be a 2-D tensor, got "
                             f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
        if not w.is_floating_point():
            raise TypeError(f"{label(i)} must be floating point, got dtype {w.dtype}")
        if min(w.shape) == 0:
            raise ValueError(f"{label(i)} has an empty dimension: shape {tuple(w.shape)}")
        dev = torch.device(device) if device is not None else w.device
        groups[(tuple(w.shape), dev)].append(i)
    out: list[torch.Tensor | None] = [None] * len(mats)
    for (shape, dev), idx in groups.items():
        if method == "gram" and dev.type == "cpu" and lapack != "torch":
            ev = _gram_eigvalsh_numpy([mats[i] for i in idx], shape, dtype)                # [B, n] ascending
            if ev is None:
                _raise_nonfinite(mats, label)
        else:
            stack = torch.stack([mats[i].detach().to(device=dev, dtype=dtype) for i in idx])  # [B, N, K]
            if method == "svd":
                if not bool(torch.isfinite(stack).all()):  # else svdvals fails with an opaque _LinAlgError
                    _raise_nonfinite(mats, label)
                ev = torch.linalg.svdvals(stack).square()                                 # [B, n] descending
            else:
                st = stack if shape[0] <= shape[1] else stack.transpose(1, 2)              # [B, n, max]
                gram = st @ st.transpose(1, 2)                                             # [B, n, n]
                if not bool(torch.isfinite(gram.diagonal(dim1=1, dim2=2)).all()):
                    _raise_nonfinite(mats, label)
                ev = torch.linalg.eigvalsh(gram).clamp_min_(0)                             # [B, n] ascending
            ev = ev.sort(dim=1).values
        for j, i in enumerate(idx):
            out[i] = ev[j]
    return out  # type: ignore[return-value]


def _gram_eigvalsh_numpy(mats: Sequence[torch.Tensor], shape: tuple, dtype: torch.dtype) -> torch.Tensor | None:
    """The gram method through NumPy's BLAS/LAPACK: [B, n] ascending eigenvalues, or None if non-finite."""
    import numpy as np  # an install requirement; imported here so the torch-only paths never need it

    npdt = np.float64 if dtype == torch.float64 else np.float32
    # One stack in the weights' own dtype, widened once (NumPy has no bf16/fp16 matmul: those widen first).
    src = torch.stack([w.detach().to("cpu") for w in mats])
    if src.dtype not in (torch.float32, torch.float64):
        src = src.to(dtype)
    st = src.numpy().astype(npdt, copy=False)                                            # [B, N, K]
    if shape[0] > shape[1]:
        st = st.transpose(0, 2, 1)                                                       # [B, n, max]
    gram = st @ st.transpose(0, 2, 1)                                                    # [B, n, n]
    if not np.isfinite(np.einsum("bii->bi", gram)).all():
        return None
    ev = torch.from_numpy(np.linalg.eigvalsh(gram)).clamp_min_(0)                        # [B, n] ascending
    return ev.sort(dim=1).values  # LAPACK's order is ascending already; sort keeps the contract explicit


def _raise_nonfinite(mats: Sequence[torch.Tensor], label) -> None:
    """Names the first matrix with NaN/Inf (a Gram diagonal can also overflow from finite entries)."""
    for i, w in enumerate(mats):
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{label(i)} contains NaN or Inf: no spectrum")
    raise ValueError("the Gram matrix of some matrix overflows (entries beyond ~1e154 in float64): no spectrum")


def _candidates(lam: torch.Tensor, valid: torch.Tensor, start: torch.Tensor, mode: str) -> torch.Tensor:
    """Boolean [B, n] mask of candidate x_min indices (never the last eigenvalue)."""
    B, n = lam.shape
    ar = torch.arange(n, device=lam.device).expand(B, n)
    base = valid & (ar < n - 1)
    if mode == "scan":
        return base
    if mode == "median":
        # TempBalance's xmin_mid: index len(nz)/2 of the kept eigenvalues.
        mid = start + (n - start) // 2
        return base & (ar == mid.unsqueeze(1))
    lo10 = torch.where(valid, lam, torch.ones_like(lam)).log10()
    big = torch.finfo(lam.dtype).max
    vmin = torch.where(valid, lo10, torch.full_like(lo10, big)).amin(1, keepdim=True)   # [B, 1]
    vmax = torch.where(valid, lo10, torch.full_like(lo10, -big)).amax(1, keepdim=True)  # [B, 1]
    width = (vmax - vmin) / HIST_BINS
    # np.histogram / torch.histc bins: [e_b, e_{b+1}) with the top edge in the last bin.
    b = torch.where(width > 0, ((lo10 - vmin) / torch.where(width > 0, width, torch.ones_like(width))).floor(),
                    torch.zeros_like(lo10)).clamp_(0, HIST_BINS - 1).long()
    counts = torch.zeros(B, HIST_BINS, dtype=torch.long, device=lam.device)
    counts.scatter_add_(1, b, valid.long())
    ih = counts.argmax(1, keepdim=True)                                                  # first max on ties
    peak = torch.pow(torch.tensor(10.0, dtype=lam.dtype, device=lam.device), vmin + ih.to(lam.dtype) * width)
    lower = torch.log10(0.95 * peak) if mode == "faithful" else 0.95 * peak
    return base & (lam >= lower) & (lam <= 1.5 * peak)


def degenerate_rows(lam: torch.Tensor, eps: float, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low_rank [B], flat [B])`` bool masks of the degenerate rows of sorted eigenvalues (module docstring)."""
    n = lam.shape[1]
    top = lam[:, -1:]                                                          # [B, 1] λ_max
    rel = max(float(eps) ** 2, n * torch.finfo(torch.float64).eps)
    floor = torch.clamp_min(top * rel, max(float(threshold), 0.0))             # [B, 1]
    above = lam > floor
    low_rank = above.sum(1) < MIN_EIGS
    lo = torch.where(above, lam, top).amin(1)                                  # smallest λ above the floor
    flat = ~low_rank & ((top.squeeze(1) - lo) <= FLAT_EPS * float(eps) * top.squeeze(1))
    return low_rank, flat


def hill_fit(lam: torch.Tensor, xmin: str = "faithful", threshold: float = 0.0,
             eps: float | None = None) -> dict[str, torch.Tensor]:
    """Power-law fit of each row of sorted eigenvalues.

    Args:
        lam: [B, n] eigenvalues, each row sorted ascending (fp32 or fp64).
        xmin: one of ``XMIN_MODES`` (see the module docstring).
        threshold: eigenvalues ≤ max(threshold, 0) are ignored.
        eps: machine epsilon of the matrices the eigenvalues came from (default: float32's), for the
            degenerate-spectrum test.
    Returns:
        dict of [B] tensors: ``alpha``, ``D`` (KS distance), ``xmin`` (chosen λ), ``n_tail`` (tail size, long),
        ``ok`` (bool: some candidate had α > 1; otherwise alpha is what the published loop returns, usually 0),
        ``degenerate`` (bool: low-rank or near-constant spectrum, see the module docstring; alpha is NaN there).
    """
    if xmin not in XMIN_MODES:
        raise ValueError(f"xmin must be one of {XMIN_MODES}, got {xmin!r}")
    if not isinstance(lam, torch.Tensor) or lam.dim() != 2:
        raise ValueError(f"lam must be a [B, n] tensor, got "
                         f"{tuple(lam.shape) if isinstance(lam, torch.Tensor) else type(lam).__name__}")
    if lam.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"lam must be float32 or float64, got {lam.dtype}")
    _check_threshold(threshold)
    B, n = lam.shape
    if B == 0:
        e = lam.new_empty(0)
        return {"alpha": e, "D": e, "xmin": e, "n_tail": e.long(), "ok": e.bool(), "degenerate": e.bool()}
    if n < 2:
        raise ValueError(f"lam needs at least 2 eigenvalues per row, got shape {tuple(lam.shape)}")
    if not bool(torch.isfinite(lam).all()):
        bad = int((~torch.isfinite(lam)).any(1).nonzero()[0])
        raise ValueError(f"row {bad} of lam contains NaN or Inf")
    if bool((lam[:, 1:] < lam[:, :-1]).any()):
        raise ValueError("lam rows must be sorted ascending")
    valid = lam > max(float(threshold), 0.0)                                   # a prefix of each row is dropped
    start = n - valid.sum(1)                                                   # [B] first kept index
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                            or not math.isfinite(eps) or not 0.0 < eps < 1.0):
        raise ValueError(f"eps must be a machine epsilon in (0, 1) (e.g. torch.finfo(torch.float32).eps), got {eps!r}")
    low_rank, flat = degenerate_rows(lam, torch.finfo(torch.float32).eps if eps is None else eps, threshold)
    degenerate = low_rank | flat | (start > n - 2)                             # < 2 above threshold: no fit
    cand = _candidates(lam, valid, start, xmin)                                # [B, n]
    loglam = torch.where(valid, lam, torch.ones_like(lam)).log()               # [B, n]
    suffix = loglam.flip(1).cumsum(1).flip(1)                                  # Σ_{j≥i} ln λ_j
    ar = torch.arange(n, device=lam.device)
    m = (n - ar).to(lam.dtype)                                                 # tail size per index
    denom = suffix - m * loglam
    alpha_all = 1 + m / denom                                                  # [B, n] (inf/NaN where denom = 0)
    use = cand & (alpha_all > 1) & torch.isfinite(alpha_all)  # [ours] a constant tail has no fit
    alphas = torch.where(cand, alpha_all, torch.zeros_like(alpha_all))
    D = torch.ones_like(lam)
    cols = use.any(0).nonzero().flatten()
    if cols.numel():
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        # Tiles of a few candidates, each against columns j ≥ its first candidate only: the work is the upper
        # triangle, and every op below runs in place on one [B, C, n - s] buffer.
        step = max(1, min(_TILE_CANDIDATES, _TILE_ELEMS // max(1, B * n)))
        for s in range(c0, c1, step):
            e = min(c1, s + step)
            k = ar[s:].unsqueeze(0) - ar[s:e].unsqueeze(1)                     # [C, n-s]: j - i
            emp = k.to(lam.dtype) / m[s:e].unsqueeze(1)                        # [C, n-s] empirical CDF k/m
            buf = loglam[:, s:].unsqueeze(1) - loglam[:, s:e].unsqueeze(2)     # [B, C, n-s] ln(λ_j/λ_i)
            buf.mul_(1 - alpha_all[:, s:e].unsqueeze(2)).exp_()                # (λ_j/λ_i)^{1-α} = 1 - F_fit
            buf.sub_(1 - emp).abs_().masked_fill_(k < 0, 0)                    # |F_fit - k/m| on the tail
            d = buf.amax(2)                                                    # [B, C]
            D[:, s:e] = torch.where(use[:, s:e], d, D[:, s:e])
    best = D.argmin(1, keepdim=True)                                           # first index on ties
    alpha = alphas.gather(1, best).squeeze(1)
    return {
        "alpha": torch.where(degenerate, torch.full_like(alpha, math.nan), alpha),
        "D": D.gather(1, best).squeeze(1),
        "xmin": lam.gather(1, best).squeeze(1),
        "n_tail": (n - best.squeeze(1)).long(),
        "ok": use.any(1) & ~degenerate,
        "degenerate": degenerate,
    }


def _check_threshold(threshold) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(float(threshold)):
        raise ValueError(f"threshold must be a real number (eigenvalues at or below it are ignored), got {threshold!r}")


def alphas_of(mats: Sequence[torch.Tensor], xmin: str = "faithful", method: str = "gram",
              dtype: torch.dtype = torch.float64, device=None, threshold: float = 0.0,
              return_degenerate: bool = False, lapack: str = "auto", names: Sequence[str] | None = None):
    """α of each matrix [len(mats)] (fp64, on CPU): eigenvalues and fits batched per shape. Degenerate spectra
    (see the module docstring; ε is each matrix's own dtype's) and, outside faithful mode, spectra with no
    candidate α > 1 get NaN; ``return_degenerate`` also returns the [len(mats)] bool mask of them. ``lapack`` and
    ``names``: see :func:`eigenvalues`."""
    _check_threshold(threshold)
    evs = eigenvalues(mats, method=method, dtype=dtype, device=device, lapack=lapack, names=names)
    out = torch.empty(len(mats), dtype=torch.float64)
    deg = torch.zeros(len(mats), dtype=torch.bool)
    by_len: dict[tuple, list[int]] = defaultdict(list)
    for i, ev in enumerate(evs):
        if ev.shape[0] < 2:   # a d×1 or 1×d weight (a gate, a score head): one singular value, no spectrum to fit
            out[i], deg[i] = math.nan, True
            continue
        # The round-off floor is the matrix's own (a bf16 weight is coarser than its fp64 spectrum).
        eps = max(torch.finfo(mats[i].dtype).eps, torch.finfo(dtype).eps)
        by_len[(ev.shape[0], ev.device, eps)].append(i)
    for (_, _, eps), idx in by_len.items():
        res = hill_fit(torch.stack([evs[i] for i in idx]), xmin=xmin, threshold=threshold, eps=eps)
        nofit = res["degenerate"] | (~res["ok"] if xmin != "faithful" else False)
        # Outside faithful mode a row with no candidate α > 1 has no fit either (faithful keeps the published 0.0).
        out[idx] = torch.where(nofit, torch.full_like(res["alpha"], math.nan), res["alpha"]).to("cpu", torch.float64)
        deg[idx] = nofit.cpu()
    return (out, deg) if return_degenerate else out
