"""Helpers for data-parallel training (DDP, FSDP2) with this package's adapter layers. See docs/DISTRIBUTED.md.

ShareLoRA's in-place gradients and DDP. A shared matrix (``accumulate="inplace"``) gets its gradient written
into ``param.grad`` from inside each layer's backward, not through autograd. Its ``AccumulateGrad`` node still
runs once, after the last layer that uses the matrix (it waits for every use), and DDP's reducer hook on that
node then reads ``param.grad`` — by then the complete sum — and all-reduces it like any other gradient; FSDP2
reduce-scatters the unsharded ``.grad`` the same way. Both are tested (``tests/python_api/test_distributed.py``).
:func:`sync_shared_grads` is the explicit fallback for setups where no reducer sees the parameter: manual data
parallelism (no DDP wrapper), or DDP under ``no_sync()`` followed by a hand-written reduction.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _check_group(group) -> None:
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The Parameters that ShareLoRA layers share in place (each once), in module order."""
    from .share import SharedLoRALinear
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    seen: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, SharedLoRALinear) and m.accumulate == "inplace":
            for grp, p in ((m.share_a, m.lora_A), (m.share_b, m.lora_B)):
                if grp is not None and p.requires_grad:
                    seen.setdefault(id(p), p)
    return list(seen.values())


@torch.no_grad()
def all_reduce_grads(params: Iterable[torch.Tensor], group=None) -> None:
    """Averages ``.grad`` of ``params`` over the process group (one flat all-reduce). A missing grad counts as
    zeros on that rank (and is created), so every rank takes part in the same collective."""
    _check_group(group)
    world = _world() if group is None else dist.get_world_size(group)
    params = [p for p in params if p.requires_grad]
    if world == 1 or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1).to(torch.float32 if p.grad.dtype != torch.float64 else torch.float64)
                      for p in params])
    dist.all_reduce(flat, group=group)
    flat.div_(world)
    off = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[off: off + n].view_as(p.grad))
        off += n


def sync_shared_grads(model: nn.Module, group=None) -> None:
    """Averages the in-place accumulated gradients of the model's shared LoRA matrices over the group.

    Call after ``backward()`` and before ``optimizer.step()`` when the model is NOT wrapped by DDP / FSDP2
    (manual data parallelism); under DDP / FSDP2 the wrapper already reduces them (calling this too would
    average twice: harmless for a mean of equal values, but a wasted collective).
    """
    all_reduce_grads(shared_parameters(model), group)


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of ``t`` over the group (a new tensor; ``t`` itself when not distributed). NaNs propagate."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    _check_group(group)
    if _world() == 1 and group is None:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, group=group)
    return out


def count_examples(batches: Iterable, batch_size_fn: Callable[[Any], int] | None = None) -> int:
    from .allocators.shaplora import _batch_size
    fn = batch_size_fn or _batch_size
    return sum(int(fn(b)) for b in batches)


def distributed_shapley_sensitivity(model: nn.Module, batches, mode: str = "taylor", *, group=None,
                                    batch_size_fn: Callable[[Any], int] | None = None,
                                    **kwargs) -> dict[str, torch.Tensor]:
    """:func:`python_api.shapley_sensitivity` on a validation split sharded over the ranks.

    Each rank scores its own ``batches``; φ is a mean over examples of per-example (Taylor) or value-function
    (exact / permutation) terms, and Shapley values are linear in the value function, so
    φ = Σ_r n_r φ_r / Σ_r n_r — one all-reduce of the per-rank sums. The result equals one process scoring the
    whole split when the estimator draws no per-example randomness: ``mode="exact"``, ``"permutation"`` with
    the same ``generator`` seed on every rank (same orderings), or ``"taylor"`` with ``q=1.0`` (full
    coalitions); with random coalitions it estimates the same quantity from different draws.
    Returns module name → φ [R] (float64, NaN at ranks masked before the call), identical on every rank.
    """
    from .allocators.shaplora import shapley_sensitivity
    if kwargs.pop("return_stats", False):
        raise ValueError("distributed_shapley_sensitivity has no return_stats: the per-rank standard errors do not "
                         "combine through the one all-reduce of the sums; score on one process for standard errors")
    batches = list(batches) if not isinstance(batches, (list, tuple)) else batches
    n = count_examples(batches, batch_size_fn)
    if n:
        local = shapley_sensitivity(model, batches, mode, batch_size_fn=batch_size_fn, **kwargs)
    else:
        # An empty shard still joins the collective (zeros) so the other ranks do not wait forever.
        from .allocators.shaplora import _Players
        players = _Players(model)
        local = players.split(torch.zeros(len(players.index), dtype=torch.float64))
        players.restore()   # the layers' own token gates back (the players clear them)
    names = list(local)
    flat = torch.cat([local[k] * n for k in names] + [torch.tensor([float(n)], dtype=torch.float64)])
    flat = all_reduce_sum(flat, group)
    total = float(flat[-1])
    if total == 0:
        raise ValueError("every rank's validation shard is empty: no examples to score")
    out, off = {}, 0
    for k in names:
        r = local[k].numel()
        out[k] = (flat[off: off + r] / total).view_as(local[k])
        off += r
    return out


def same_on_all_ranks(obj: Any, group=None) -> bool:
    """True when the picklable ``obj`` (an allocation decision, a rank pattern) is equal on every rank."""
    _check_group(group)
    world = _world() if group is None else dist.get_world_size(group)
    if world == 1:
        return True
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj, group=group)
    return all(g == gathered[0] for g in gathered)
