"""ShareLoRA's in-place shared gradient under every ordinary training loop (issue #14, class 1).

Each loop runs twice on the same initial model: with ``accumulate="inplace"`` (the layers add dA / dB into the
shared matrix's ``.grad`` from inside backward) and with ``accumulate="autograd"`` (plain autograd accumulation of
the same shared Parameter: the reference). Gradients after every backward and the parameters after every
optimiser step must agree. The loops: ``zero_grad`` before the forward, between forward and backward, or after the
step, with ``set_to_none`` True and False; micro-batch accumulation (backward per micro-batch, or all forwards
first); autocast (bf16 on CPU); activation checkpointing (reentrant and not); and DDP with ``no_sync`` (gloo,
2 processes; run by tests/python_api/test_distributed.py's spawn).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from python_api import apply_adapters
from python_api.surgery import adapter_layers
from tests.helpers import assert_close, randn
from tests.python_api.toy_models import randomize_b, toy

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
D = 16


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


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


# Every zero_grad placement and set_to_none for the plain loop; for the others, the placements that differ (the
# buffer dropped between forward and backward, zeroed in place there, or reset after the step).
CASES = [("plain", o, s) for o in ("before", "between", "after") for s in (True, False)]
CASES += [(loop, o, s) for loop in LOOPS[1:] for o, s in (("between", True), ("between", False), ("after", True))]


@pytest.mark.parametrize("loop,order,set_to_none", CASES)
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


@pytest.mark.parametrize("share,scope", [("A", "module_type"), ("B", "module_type"), ("AB", "attention")])
def test_gradient_restricted_to_other_tensors_leaves_shared_grad_alone(share, scope):
    # autograd.grad(out, x) (saliency, input-gradient penalties) and backward(inputs=[...]) without the shared
    # matrices: in-place accumulation is a side effect, so it must not happen where autograd would drop the gradient
    m, ref = _pair(share, scope)
    x = randn(2, 3, D, dtype=torch.float64).requires_grad_(True)
    (gx,) = torch.autograd.grad(m(x).sum(), x)
    (want,) = torch.autograd.grad(ref(x).sum(), x)
    assert_close(gx, want, torch.float64)
    assert all(p.grad is None for p in _shared(m).values())
    heads = list(m.classifier.parameters())
    for p in heads:
        p.requires_grad_(True)
    m(x).sum().backward(inputs=heads)
    assert all(p.grad is None for p in _shared(m).values())
    # an unrestricted backward afterwards still fills every shared matrix exactly as autograd does
    m(x).sum().backward()
    ref(x).sum().backward()
    for k, p in _shared(ref).items():
        assert_close(_shared(m)[k].grad, p.grad, torch.float64, name=k)


# ---- DDP with no_sync (gloo, 2 processes) ------------------------------------------------------------------------
# Run inside tests/python_api/test_distributed.py's one spawn (process start-up dominates the cost); these are the
# scenario and the check it calls.
def _ddp_batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(40 + rank)
    return [randn(2, 3, D, dtype=torch.float64, generator=g) for _ in range(2)]


def ddp_no_sync_grads(rank: int, world: int) -> dict:
    """Two micro-batches per rank, the first under ``no_sync()`` with ``zero_grad(set_to_none=True)`` between its
    forward and backward; returns the shared matrices' gradients for the in-place model and the autograd one."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    out = {}
    for kind, model in zip(("inplace", "autograd"), _pair("AB", "attention")):
        net = DDP(model)
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
        first, second = _ddp_batches(rank)
        with net.no_sync():                       # micro-batch 1: local accumulation only
            loss = net(first).square().mean()
            opt.zero_grad(set_to_none=True)       # between forward and backward, the order under test
            loss.backward()
        net(second).square().mean().backward()    # micro-batch 2: DDP all-reduces the accumulated sum
        out[kind] = {n: p.grad.clone() for n, p in _shared(model).items()}
    return out


def check_ddp_no_sync(outs: list[dict], world: int) -> None:
    """The reference: one process, plain autograd, the mean over ranks of each rank's two micro-batch losses."""
    _, ref = _pair("AB", "attention")
    for r in range(world):
        for x in _ddp_batches(r):
            (ref(x).square().mean() / world).backward()
    want = {n: p.grad for n, p in _shared(ref).items()}
    for r, out in enumerate(outs):
        for kind in ("inplace", "autograd"):
            for n, w in want.items():
                assert_close(out[kind][n], w, torch.float64, name=f"rank {r} {kind} {n}")
