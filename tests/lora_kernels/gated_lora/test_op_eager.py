"""The eager route (lora_kernels.ops.gated_lora → a plain autograd Function) and the registered custom op run the
same bodies: outputs and every gradient must agree exactly, for every gate kind, compaction, dropout and the
in-place accumulation buffers; tensor subclasses (fake tensors here; torch.compile in test_compile) take the
custom op."""
import pytest
import torch

from lora_kernels.gated_lora import op as ops
from tests.helpers import randn


def _custom(*args):
    return torch.ops.lora_kernels.gated_lora_forward(*args)[0]


def _case(gate_kind, dtype=torch.float64, T=13, K=11, N=9, R=6):
    g = torch.Generator().manual_seed(0)
    x = randn(T, K, dtype=dtype, generator=g, noncontiguous=True).requires_grad_(True)
    w = randn(N, K, dtype=dtype, generator=g)
    b = randn(N, dtype=dtype, generator=g)
    a = randn(R, K, dtype=dtype, generator=g).requires_grad_(True)
    bb = randn(N, R, dtype=dtype, generator=g).requires_grad_(True)
    gate = {"none": None, "rank": torch.rand(R, dtype=dtype, generator=g).requires_grad_(True),
            "token": torch.rand(T, R, dtype=dtype, generator=g).requires_grad_(True),
            "mask": torch.tensor([1, 0, 1, 1, 0, 1], dtype=dtype)}[gate_kind]
    active = torch.tensor([0, 2, 3, 5]) if gate_kind == "mask" else None
    return x, w, b, a, bb, gate, active


@pytest.mark.parametrize("gate_kind", ["none", "rank", "token", "mask"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_eager_route_equals_custom_op(gate_kind, dropout_p):
    x, w, b, a, bb, gate, active = _case(gate_kind)
    seed = torch.tensor([7]) if dropout_p else None
    dy = torch.randn(x.shape[0], w.shape[0], dtype=x.dtype)
    leaves = [t for t in (x, a, bb, gate) if t is not None and t.requires_grad]
    outs = []
    for fn in (ops.gated_lora, _custom):
        args = (x, w, b, a, bb, gate, 2.0, dropout_p, seed, active, None, None)
        y = fn(*args)
        grads = torch.autograd.grad(y, leaves, dy)
        outs.append((y, grads))
    (y0, g0), (y1, g1) = outs
    assert torch.equal(y0, y1)
    for u, v in zip(g0, g1):
        assert torch.equal(u, v)


@pytest.mark.parametrize("masked", [False, True])
def test_eager_route_accumulates_into_buffers_like_the_custom_op(masked):
    x, w, b, a, bb, gate, active = _case("mask" if masked else "none")
    dy = torch.randn(x.shape[0], w.shape[0], dtype=x.dtype)
    bufs = []
    for fn in (ops.gated_lora, _custom):
        acc_a, acc_b = torch.ones_like(a), torch.ones_like(bb)
        y = fn(x, w, b, a, bb, gate, 0.5, 0.0, None, active, acc_a, acc_b)
        (dx,) = torch.autograd.grad(y, [x], dy)
        bufs.append((dx, acc_a, acc_b))
    for u, v in zip(*bufs):
        assert torch.equal(u, v)
    assert not torch.equal(bufs[0][1], torch.ones_like(a))     # something was added


def test_fake_tensors_take_the_custom_op(monkeypatch):
    calls = []
    real = ops._EagerGatedLoRA.apply
    monkeypatch.setattr(ops._EagerGatedLoRA, "apply", lambda *a: calls.append(1) or real(*a))
    x, w, b, a, bb, gate, active = _case("none", torch.float32)
    ops.gated_lora(x, w, b, a, bb, None, 1.0, 0.0, None, None, None, None)
    assert calls == [1]
    ops.gated_lora(x, torch.nn.Parameter(w, requires_grad=False), b, a, bb, None, 1.0, 0.0, None, None, None, None)
    assert calls == [1, 1]                                      # nn.Parameter is a plain tensor here

    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode()
    fx, fw, fa, fb = (mode.from_tensor(t) for t in (x.detach(), w, a.detach(), bb.detach()))
    with mode:
        y = ops.gated_lora(fx, fw, None, fa, fb, None, 1.0, 0.0, None, None, None, None)
    assert tuple(y.shape) == (x.shape[0], w.shape[0]) and calls == [1, 1]
