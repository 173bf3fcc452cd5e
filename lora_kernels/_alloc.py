"""Output allocation for launchers. Tests switch on poisoning (NaN fill) to prove every element is written."""
from __future__ import annotations

import contextlib

import torch

_POISON = [False]


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """Within this block, kernel outputs are allocated filled with NaN (ints with -1)."""
    old = _POISON[0]
    _POISON[0] = enabled
    try:
        yield
    finally:
        _POISON[0] = old


def empty(*shape, dtype, device) -> torch.Tensor:
    t = torch.empty(*shape, dtype=dtype, device=device)
    if _POISON[0]:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t
