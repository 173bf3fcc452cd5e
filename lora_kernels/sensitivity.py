"""Batched AdaLoRA-style sensitivity update over every adapter tensor of a model (ALGORITHMS.md §2).

For every element w of every adapter tensor, with gradient g (β1 = β2 = 0.85 by default):
    I = |w·g|
    Ī ← β1·Ī + (1−β1)·I
    Ū ← β2·Ū + (1−β2)·|I − Ī|        # the UPDATED Ī, as PEFT's RankAllocator.update_ipt does
    s = Ī·Ū
and per rank i of the module the adapter belongs to (PEFT's ``mask_to_budget`` triplet score):
    S_i = s(λ_i) + mean_k s(A_ik) + mean_n s(B_ni)

Adapter kinds: 0 = λ (E) [R], 1 = A [R, K], 2 = B [N, R].

Backends (one signature, see :func:`fused_sensitivity_update`): ``torch`` (this file, the reference),
``triton`` (:mod:`lora_kernels.triton_sensitivity`, a pointer-table multi-tensor kernel) and ``cuda``
(:mod:`lora_kernels.cuda_sensitivity`). A step whose gradients contain NaN/Inf leaves every state and
score untouched and returns True (as a 0-dim bool tensor, so GPU callers need no host sync).
"""
from __future__ import annotations

import torch

from .checks import FLOAT_DTYPES
from .dispatch import Problem, select
from .gated import _Lazy

KIND_E, KIND_A, KIND_B = 0, 1, 2


def ranks_of(kind: int, shape: tuple[int, ...]) -> int:
    """Number of ranks R of an adapter tensor of this kind and shape."""
    return shape[0] if kind in (KIND_E, KIND_A) else shape[1]


def check_sensitivity_args(params, grads, ipt, unc, kinds, score_offsets, scores, beta1, beta2) -> None:
    """Validates the arguments of :func:`fused_sensitivity_update`; errors name the argument and value."""
    n = len(params)
    for name, lst in (("grads", grads), ("ipt", ipt), ("unc", unc), ("kinds", kinds),
                      ("score_offsets", score_offsets)):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} entries but params has {n}")
    if not isinstance(scores, torch.Tensor) or scores.dtype != torch.float32 or scores.dim() != 1:
        raise TypeError(f"scores must be a 1-D float32 tensor [total_R], got "
                        f"{getattr(scores, 'dtype', type(scores).__name__)} shape {tuple(getattr(scores, 'shape', ()))}")
    if not scores.is_contiguous():
        raise ValueError("scores must be contiguous (it is accumulated into in place)")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= float(b) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {b}")
    for j in range(n):
        p, g, a, u, k, off = params[j], grads[j], ipt[j], unc[j], kinds[j], score_offsets[j]
        if k not in (KIND_E, KIND_A, KIND_B):
            raise ValueError(f"kinds[{j}] must be 0 (E [R]), 1 (A [R,K]) or 2 (B [N,R]), got {k!r}")
        want = 1 if k == KIND_E else 2
        for name, t in (("params", p), ("grads", g)):
            if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{name}[{j}] must be a floating tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            if t.dim() != want:
                raise ValueError(f"{name}[{j}] (kind {k}) must have {want} dims, got shape {tuple(t.shape)}")
            if t.device != scores.device:
                raise ValueError(f"{name}[{j}] is on {t.device} but scores is on {scores.device}")
        if g.shape != p.shape:
            raise ValueError(f"grads[{j}] has shape {tuple(g.shape)} but params[{j}] has {tuple(p.shape)}")
        for name, t in (("ipt", a), ("unc", u)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.shape != p.shape:
                raise TypeError(f"{name}[{j}] must be float32 with shape {tuple(p.shape)}, got "
                                f"{getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}")
            if not t.is_contiguous() or t.device != scores.device:
                raise ValueError(f"{name}[{j}] must be contiguous and on {scores.device} (state is updated in place)")
        r = ranks_of(k, tuple(p.shape))
        if not isinstance(off, int) or off < 0 or off + r > scores.numel():
            raise ValueError(f"score_offsets[{j}]={off!r} with R={r} does not fit scores of length {scores.numel()}")


# ---- torch reference ---------------------------------------------------------------------------------
def _rank_index(kinds, shapes, offsets, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For the concatenation of all adapter tensors (row-major), each element's score slot and weight."""
    idx, w = [], []
    for k, shape, off in zip(kinds, shapes, offsets):
        if k == KIND_E:
            i = torch.arange(shape[0], device=device)
            wt = 1.0
        elif k == KIND_A:                                    # [R, K]: row i is rank i
            i = torch.arange(shape[0], device=device).repeat_interleave(shape[1])
            wt = 1.0 / shape[1]
        else:                                                # [N, R]: column i is rank i
            i = torch.arange(shape[1], device=device).repeat(shape[0])
            wt = 1.0 / shape[0]
        idx.append(i + off)
        w.append(torch.full((i.numel(),), wt, dtype=torch.float32, device=device))
    return torch.cat(idx), torch.cat(w)


_INDEX_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _cached_rank_index(kinds, shapes, offsets, device):
    key = (tuple(kinds), tuple(shapes), tuple(offsets), str(device))
    hit = _INDEX_CACHE.get(key)
    if hit is None:
        if len(_INDEX_CACHE) > 64:  # a model has one layout; bound the cache for callers that vary it
            _INDEX_CACHE.clear()
        hit = _INDEX_CACHE[key] = _rank_index(kinds, shapes, offsets, device)
    return hit


def _flat_view(ts: list[torch.Tensor]) -> torch.Tensor | None:
    """The one flat fp32 buffer ``ts`` are consecutive slices of (in order), or None."""
    base = ts[0]._base if ts[0]._base is not None else None
    if base is None or base.dim() != 1:
        return None
    pos = ts[0].data_ptr() - base.data_ptr()
    if pos != 0:
        return None
    esz = base.element_size()
    for t in ts:
        if t._base is not base or t.data_ptr() - base.data_ptr() != pos:
            return None
        pos += t.numel() * esz
    return base[: pos // esz]


def sensitivity_update_ref(params, grads, ipt, unc, kinds, score_offsets, scores, beta1, beta2) -> torch.Tensor:
    """Pure-torch reference of :func:`fused_sensitivity_update` (same arguments, same semantics).

    Multi-tensor, no per-parameter Python loop in the arithmetic: when ``ipt`` and ``unc`` are consecutive
    slices of one flat buffer each (as :class:`python_api.SensitivityTracker` allocates them), the update
    runs as a handful of ops on the flat buffers; otherwise as ``torch._foreach_*`` ops. Per-parameter
    loops cost ~3.4 ms per step on MiniLM-L6 (PERFORMANCE.md) in op launch overhead alone.
    """
    device = scores.device
    if not params:
        return torch.zeros((), dtype=torch.bool, device=device)
    gnorm = torch._foreach_norm(list(grads), float("inf"))
    bad = ~torch.isfinite(torch.stack(gnorm)).all()
    if device.type == "cpu" and bool(bad):  # on CPU the check costs no device sync
        return bad
    shapes = [tuple(p.shape) for p in params]
    flat_i, flat_u = _flat_view(list(ipt)), _flat_view(list(unc))
    if flat_i is not None and flat_u is not None:
        pf = torch.cat([p.reshape(-1) for p in params]).float()
        gf = torch.cat([g.reshape(-1) for g in grads]).float()
        cur = pf.mul_(gf).abs_()                                                  # I
        if device.type == "cpu":  # in place: every pass over the 0.5M-entry state is what costs on CPU
            new_i = flat_i.mul_(beta1).add_(cur, alpha=1.0 - beta1)               # Ī
            new_u = flat_u.mul_(beta2).add_(cur.sub_(new_i).abs_(), alpha=1.0 - beta2)  # Ū, with the updated Ī
            s = new_i * new_u
        else:  # no host sync: a skipped step writes the old state back
            new_i = flat_i * beta1 + cur * (1.0 - beta1)
            new_u = flat_u * beta2 + cur.sub_(new_i).abs_().mul_(1.0 - beta2)
            s = (new_i * new_u).masked_fill_(bad, 0.0)
            flat_i.copy_(torch.where(bad, flat_i, new_i))
            flat_u.copy_(torch.where(bad, flat_u, new_u))
        idx, w = _cached_rank_index(kinds, shapes, score_offsets, device)
        scores.index_add_(0, idx, s.mul_(w))
        return bad
    pf = [p.float() for p in params]
    gf = [g.float() for g in grads]
    cur = torch._foreach_mul(pf, gf)
    torch._foreach_abs_(cur)
    new_i = torch._foreach_add(torch._foreach_mul(list(ipt), beta1), cur, alpha=1.0 - beta1)
    torch._foreach_sub_(cur, new_i)
    torch._foreach_abs_(cur)
    new_u = torch._foreach_add(torch._foreach_mul(list(unc), beta2), cur, alpha=1.0 - beta2)
    s = torch.cat([t.reshape(-1) for t in torch._foreach_mul(new_i, new_u)])
    if device.type != "cpu":  # no host sync: a skipped step writes the old state back
        s = s.masked_fill_(bad, 0.0)
        new_i = [torch.where(bad, a, b) for a, b in zip(ipt, new_i)]
        new_u = [torch.where(bad, a, b) for a, b in zip(unc, new_u)]
    torch._foreach_copy_(list(ipt), new_i)
    torch._foreach_copy_(list(unc), new_u)
    idx, w = _cached_rank_index(kinds, shapes, score_offsets, device)
    scores.index_add_(0, idx, s.mul_(w))
    return bad


class _TorchBackend:
    @staticmethod
    def supports(p: Problem) -> tuple[bool, str]:
        return True, "reference"

    fused_sensitivity_update = staticmethod(sensitivity_update_ref)


REGISTRY = {
    "torch": _TorchBackend(),
    "triton": _Lazy(".triton_sensitivity"),
    "cuda": _Lazy(".cuda_sensitivity"),
}


def fused_sensitivity_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    ipt: list[torch.Tensor],
    unc: list[torch.Tensor],
    kinds: list[int],
    score_offsets: list[int],
    scores: torch.Tensor,
    beta1: float = 0.85,
    beta2: float = 0.85,
) -> torch.Tensor:
    """One multi-tensor AdaLoRA sensitivity step for every adapter tensor, reduced per rank.

    Args:
        params: adapter tensors (fp32/fp16/bf16); kind 0 = λ [R], 1 = A [R, K], 2 = B [N, R].
        grads: their gradients, same shapes.
        ipt, unc: fp32 EMA state Ī, Ū, same shapes, contiguous; updated in place.
        kinds: 0/1/2 per tensor.
        score_offsets: where each tensor's module's ranks start in ``scores``.
        scores: fp32 [total_R]; ``s``, the row means of A's and the column means of B's ``s`` are
            ADDED to it (the caller zeroes it first).
        beta1, beta2: EMA factors in [0, 1).
    Returns:
        0-dim bool tensor: True when some gradient was non-finite; then nothing was modified.
    """
    check_sensitivity_args(params, grads, ipt, unc, kinds, score_offsets, scores, beta1, beta2)
    dtype = params[0].dtype if params else torch.float32
    _, impl = select(Problem("sensitivity", scores.device, dtype), REGISTRY)
    return impl.fused_sensitivity_update(list(params), list(grads), list(ipt), list(unc), list(kinds),
                                         list(score_offsets), scores, float(beta1), float(beta2))


def per_example_gate_grad(dg: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-token gate gradient reduced per example: ``out[b, i] = Σ_{t∈b} dG[t, i]`` (ALGORITHMS.md §3).

    Args:
        dg: [T, R] gradient of the per-token gate, tokens flattened row-major from [batch, S].
        batch: number of examples B; T must be a multiple of B.
    Returns:
        [B, R] fp32. Reference implementation (``dg.view(B, S, R).sum(1)``); fusing it into the gated op's
        backward is the kernels' job.
    """
    if not isinstance(dg, torch.Tensor) or dg.dim() != 2:
        raise ValueError(f"dg must be a [T, R] tensor, got shape {tuple(getattr(dg, 'shape', ()))}")
    if not isinstance(batch, int) or batch < 0 or (batch == 0 and dg.shape[0]) or (batch and dg.shape[0] % batch):
        raise ValueError(f"batch={batch!r} must be a positive int dividing T={dg.shape[0]}")
    if batch == 0:
        return dg.new_zeros(0, dg.shape[1], dtype=torch.float32)
    return dg.float().view(batch, dg.shape[0] // batch, dg.shape[1]).sum(1)
