"""Filesystem fault injection for the checkpoint tests: records every write step a save takes below a root
directory (mkdir, open, write, fsync, replace, rmtree) and runs an action (raise, SIGKILL) at one of them.

Used in-process by test_checkpoint_faults.py and, for the SIGKILL cases, in a driver subprocess that forks
one child per kill point (``python -m tests.python_api.fs_faults DIR``).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable

OPS = ("mkdir", "open", "write", "fsync", "replace", "rmtree")


class Tracer:
    """Wraps ``os.{mkdir,open,write,fsync,close,replace}`` and ``shutil.rmtree`` for paths below ``root``.

    ``trace`` lists ``(op, path)`` in call order; ``action(i, op, path)`` runs BEFORE step ``i`` executes
    (raise there and the step never happens). Calls inside rmtree are one step, not traced one by one.
    """

    def __init__(self, root: str, action: Callable[[int, str, str], None] | None = None):
        self.root = os.path.realpath(root)
        self.action = action
        self.trace: list[tuple[str, str]] = []
        self._fds: dict[int, str] = {}
        self._quiet = 0

    def _under(self, p) -> bool:
        try:
            p = os.fspath(p)
        except TypeError:
            return False
        return isinstance(p, str) and os.path.isabs(p) and (p + "/").startswith(self.root + "/")

    def _step(self, op: str, path: str) -> None:
        i = len(self.trace)
        self.trace.append((op, path))
        if self.action is not None:
            self.action(i, op, path)

    @contextlib.contextmanager
    def installed(self):
        real = {n: getattr(os, n) for n in ("mkdir", "open", "write", "fsync", "close", "replace")}
        real_rmtree = shutil.rmtree

        def mkdir(p, *a, **k):
            if not self._quiet and self._under(p):
                self._step("mkdir", os.fspath(p))
            return real["mkdir"](p, *a, **k)

        def open_(p, *a, **k):
            traced = not self._quiet and self._under(p)
            if traced:
                self._step("open", os.fspath(p))
            fd = real["open"](p, *a, **k)
            if traced:
                self._fds[fd] = os.fspath(p)
            return fd

        def write(fd, data):
            if not self._quiet and fd in self._fds:
                self._step("write", self._fds[fd])
            return real["write"](fd, data)

        def fsync(fd):
            if not self._quiet and fd in self._fds:
                self._step("fsync", self._fds[fd])
            return real["fsync"](fd)

        def close(fd):
            self._fds.pop(fd, None)
            return real["close"](fd)

        def replace(src, dst, *a, **k):
            if not self._quiet and self._under(src):
                self._step("replace", f"{os.fspath(src)} -> {os.fspath(dst)}")
            return real["replace"](src, dst, *a, **k)

        def rmtree(p, *a, **k):
            if not self._quiet and self._under(p):
                self._step("rmtree", os.fspath(p))
            self._quiet += 1
            try:
                return real_rmtree(p, *a, **k)
            finally:
                self._quiet -= 1

        patched = {"mkdir": mkdir, "open": open_, "write": write, "fsync": fsync, "close": close,
                   "replace": replace}
        try:
            for n, f in patched.items():
                setattr(os, n, f)
            shutil.rmtree = rmtree
            yield self
        finally:
            for n, f in real.items():
                setattr(os, n, f)
            shutil.rmtree = real_rmtree


def kill_at(k: int) -> Callable[[int, str, str], None]:
    def action(i, op, path):
        if i == k:
            os.kill(os.getpid(), signal.SIGKILL)
    return action


def _driver(work: str, steps: int) -> None:
    """For k in range(steps): ``work/k/ckpt`` holds the old checkpoint (seed 0, a copy in ``work/old-k``); a
    forked child saves the new one (seed 1) over it and SIGKILLs itself before step k. Writes
    ``work/status.json`` (k -> how the child ended). One torch thread: the children are forked from here."""
    import torch
    torch.set_num_threads(1)
    from python_api.checkpoint import save_adapters
    from tests.python_api.test_checkpoint_faults import adapted

    old, new = adapted(0), adapted(1)
    status = {}
    for k in range(steps):
        d = os.path.join(work, str(k))
        os.makedirs(d)
        save_adapters(old, os.path.join(d, "ckpt"))
        shutil.copytree(os.path.join(d, "ckpt"), os.path.join(work, f"old-{k}"))   # the bytes to compare with
        pid = os.fork()
        if pid == 0:  # child: never returns into this loop
            try:
                with Tracer(d, kill_at(k)).installed():
                    save_adapters(new, os.path.join(d, "ckpt"))
            finally:
                os._exit(0)
        _, st = os.waitpid(pid, 0)
        status[k] = "killed" if os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGKILL else f"exit {st}"
    with open(os.path.join(work, "status.json"), "w") as f:
        json.dump(status, f)


if __name__ == "__main__":
    _driver(sys.argv[1], int(sys.argv[2]))
