"""Helpers for tests that run gloo ranks under torch.multiprocessing.spawn."""
from __future__ import annotations

import os
import sys

import torch.distributed as dist


def leave_rank() -> None:
    """End a spawned rank once its results are saved.

    Trainers and DDP/FSDP wrappers still hold the gloo group, and tearing it down (explicitly or while the
    interpreter finalizes) can abort the process: SIGABRT, "terminate called without an active exception", seen
    once in CI after the rank's last Trainer run. The ranks wait for each other, so none closes its sockets while
    another is mid-collective, then leave without running destructors.
    """
    try:
        if dist.is_initialized():
            dist.barrier()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
