"""ShareLoRA's in-place shared gradient under every ordinary training loop (issue #14, class 1).

Each loop runs twice on the same initial model: with ``accumulate="inplace"`` (the layers add dA / dB into the
shared matrix's ``.grad`` from inside backward) and with ``accumulate="autograd"`` (plain autograd accumulation of
the same shared Parameter: the reference). Gradients after every backward and the parameters after every
optimiser step must agree. The loops: ``zero_grad`` before the forward, between forward and backward, or after the
step, with ``set_to_none`` True and False; micro-batch accumulation (backward per micro-batch, or all forwards
first); autocast (bf16 on CPU); activation checkpointing (reentrant and not); and DDP with ``no_sync`` (gloo,
2 processes).
"""
from __future__ import annotations

import copy
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

from python_api import apply_adapters
from python_api.surgery import adapter_layers
from tests.helpers import assert_close, randn
from tests.python_api.toy_models import randomize_b, toy

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
D = 16


class _Checkpointed(nn.Module):
    """The toy model with every block under torch.utils.checkpoint."""

    def __init__(self, inner: nn.Module, reentrant: bool):
        super().__init__()
        self.inner, self.reentrant = inner, reentrant

    def forward(self, x):
        if self.reentrant:
            x = x.requires_grad_(True)   # the reentrant variant only back-propagates to inputs that need grad
        for blk in self.inner.layers:
            x = checkpoint(blk, x, use_reentrant=self.reentrant)
        return self.inner.classifier(x.mean(1))


def _pair(share: str, scope: str, dtype=torch.float64) -> tuple[nn.Module, nn.Module]:
    """(in-place model, autograd reference) with the same shared matrices' values."""
    m = apply_adapters(toy(0, dtype=dtype), QKVO, r=4, share=share, share_scope=scope)
    randomize_b(m)
    ref = copy.deepcopy(m)
    for layer in adapter_layers(ref).values():
        layer.accumulate = "autograd"
    assert all(layer.accumulate == "inplace" for layer in adapter_layers(m).values())
    return m, ref


def _shared(model: nn.Module) -> dict[str, torch.Tensor]:
    """The shared matrices (each once) by their first module's name."""
    out, seen = {}, set()
    for name, layer in adapter_layers(model).items():
        for pname in ("lora_A", "lora_B"):
            p = getattr(layer, pname)
            if id(p) not in seen:
                seen.add(id(p))
                out[f"{name}.{pname}"] = p
    return out


def _batches(n: int, dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [randn(2, 3, D, dtype=dtype, generator=g) for _ in range(n)]


def _run(model: nn.Module, loop: str, order: str, set_to_none: bool, dtype, steps: int = 2) -> list[dict]:
    """Trains ``steps`` SGD steps; returns the shared matrices' gradients and values after each step."""
    net = model
    if loop.startswith("ckpt"):
        net = _Checkpointed(model, reentrant=loop == "ckpt-reentrant")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    micro = 3 if loop.startswith("accum") else 1
    data = _batches(steps * micro, dtype)
    trace = []

    def fwd(x):
        if loop == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return net(x).float().square().mean()
        return net(x).square().mean()

    for step in range(steps):
        xs = data[step * micro:(step + 1) * micro]
        if order == "before":
            opt.zero_grad(set_to_none=set_to_none)
        if loop == "accum-forward-first":
            # every micro-batch's forward first, then one backward of the sum (a common accumulation form)
            losses = [fwd(x) / micro for x in xs]
            if order == "between":
                opt.zero_grad(set_to_none=set_to_none)
            torch.stack(losses).sum().backward()
        else:
            for i, x in enumerate(xs):
                loss = fwd(x) / micro
                if order == "between" and i == 0:
                    opt.zero_grad(set_to_none=set_to_none)
                loss.backward()
        grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in _shared(model).items()}
        opt.step()
        if order == "after":
            opt.zero_grad(set_to_none=set_to_none)
        trace.append({"grads": grads, "params": {n: p.detach().clone() for n, p in _shared(model).items()}})
    return trace


def _compare(got: list[dict], want: list[dict], dtype) -> None:
    for step, (g, w) in enumerate(zip(got, want)):
        for n, ref in w["grads"].items():
            assert ref is not None, f"reference got no gradient for {n}"
            assert g["grads"][n] is not None, f"step {step}: shared {n} has .grad None (it would never train)"
            assert_close(g["grads"][n], ref.double(), dtype, name=f"step {step} grad {n}")
        for n, ref in w["params"].items():
            assert_close(g["params"][n], ref.double(), dtype, name=f"step {step} param {n}")


LOOPS = ["plain", "accum-backward-each", "accum-forward-first", "autocast", "ckpt", "ckpt-reentrant"]


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("order", ["before", "between", "after"])
@pytest.mark.parametrize("loop", LOOPS)
def test_shared_gradient_in_every_training_loop(loop, order, set_to_none):
    # fp64 models give a tight comparison; autocast runs an fp32 model with bf16 compute (bf16 tolerance).
    dtype = torch.float32 if loop == "autocast" else torch.float64
    m, ref = _pair("AB", "attention", dtype)
    got = _run(m, loop, order, set_to_none, dtype)
    want = _run(ref, loop, order, set_to_none, dtype)
    _compare(got, want, torch.bfloat16 if loop == "autocast" else dtype)


@pytest.mark.parametrize("share,scope", [("A", "module_type"), ("B", "module_type"), ("A", "attention")])
def test_zero_grad_between_forward_and_backward_every_share_mode(share, scope):
    m, ref = _pair(share, scope)
    _compare(_run(m, "plain", "between", True, torch.float64), _run(ref, "plain", "between", True, torch.float64),
             torch.float64)


def test_forward_makes_no_gradient_buffer():
    # The buffer is bound when backward runs: a forward alone (evaluation with grad on, a forward whose loss is
    # dropped) leaves .grad untouched.
    m, _ = _pair("A", "module_type")
    m(randn(2, 3, D, dtype=torch.float64))
    assert all(p.grad is None for p in _shared(m).values())


# ---- DDP with no_sync (gloo, 2 processes) ------------------------------------------------------------------------
WORLD = 2
SPAWN_TIMEOUT_S = 240


def _ddp_batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(40 + rank)
    return [randn(2, 3, D, dtype=torch.float64, generator=g) for _ in range(2)]


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str):
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = {}
    try:
        for kind, model in zip(("inplace", "autograd"), _pair("AB", "attention")):
            net = DDP(model)
            opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
            first, second = _ddp_batches(rank)
            with net.no_sync():               # micro-batch 1: local accumulation only
                loss = net(first).square().mean()
                opt.zero_grad(set_to_none=True)   # between forward and backward, the order under test
                loss.backward()
            net(second).square().mean().backward()   # micro-batch 2: DDP all-reduces the accumulated sum
            out[kind] = {n: p.grad.clone() for n, p in _shared(model).items()}
    except Exception:  # reported by the test
        import traceback
        out["error"] = traceback.format_exc()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="gloo is not available")
def test_ddp_no_sync_accumulates_shared_gradient():
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.spawn(_ddp_worker, args=(WORLD, os.path.join(d, "init"), d), nprocs=WORLD, join=False)
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail(f"the {WORLD} spawned ranks did not finish within {SPAWN_TIMEOUT_S} s")
        res = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    for r, out in enumerate(res):
        assert "error" not in out, f"rank {r}:\n{out['error']}"
    # The reference: one process, plain autograd, the mean over ranks of each rank's two micro-batch losses.
    _, ref = _pair("AB", "attention")
    for r in range(WORLD):
        for x in _ddp_batches(r):
            (ref(x).square().mean() / WORLD).backward()
    want = {n: p.grad for n, p in _shared(ref).items()}
    for r, out in enumerate(res):
        for kind in ("inplace", "autograd"):
            for n, w in want.items():
                assert_close(out[kind][n], w, torch.float64, name=f"rank {r} {kind} {n}")
