"""Readable pure-torch reference of the fused sensitivity update (docs/ALGORITHMS.md §2): the oracle for the
native, Triton and CUDA backends, and the ``torch`` backend itself.
"""
from __future__ import annotations

import torch

from ..codes import KIND_A, KIND_E


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


