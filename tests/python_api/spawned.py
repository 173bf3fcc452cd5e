"""Helpers for tests that run gloo ranks under torch.multiprocessing.spawn."""
from __future__ import annotations

import datetime
import os
import sys

import torch.distributed as dist


def leave_rank(ok: bool = True, timeout_s: float = 60.0) -> None:
    """End a spawned rank once its results are saved.

    Trainers and DDP/FSDP wrappers still hold the gloo group, and tearing it down (explicitly or while the
    interpreter finalizes) can abort the process: SIGABRT, "terminate called without an active exception", seen
    once in CI after the rank's last Trainer run. The ranks wait for each other, so none closes its sockets while
    another is mid-collective, then leave without running destructors. A rank that failed (``ok`` False) does not
    wait: its peers may be stuck in a collective it never joined, and its leaving breaks them out (they record the
    error); the wait itself is bounded by ``timeout_s``.
    """
    try:
        if ok and dist.is_initialized():
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def rank_errors(out_dir: str, world: int) -> str:
    """The errors the ranks saved in ``rank{r}.pt`` (for a test that gave up waiting): '' when none was saved."""
    import torch

    msgs = []
    for r in range(world):
        p = os.path.join(out_dir, f"rank{r}.pt")
        if os.path.exists(p):
            res = torch.load(p, weights_only=False)
            errs = [res["error"]] if "error" in res else [v["error"] for v in res.values()
                                                          if isinstance(v, dict) and "error" in v]
            msgs += [f"rank {r}:\n{e}" for e in errs]
    return "\n".join(msgs)
