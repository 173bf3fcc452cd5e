"""lora_kernels.gated_lora.cpu (auto's CPU backend for the gated op) against the reference oracle run in float64 on the
same values: every gate kind, dropout, non-contiguous x, the in-place accumulation buffers, partial ``needs`` and
odd sizes, in float64 / float32 / bf16 (bf16 activations with fp32 master adapters, as autocast runs them)."""
import pytest
import torch

from lora_kernels.gated_lora import cpu as cpu_fast
from lora_kernels.gated_lora import op as gated
from lora_kernels.gated_lora import reference
from tests.helpers import assert_close, randn

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
SIZES = [(13, 11, 9, 5), (67, 48, 40, 8)]        # (T, K, N, R): odd sizes, then a multi-tile one


def _case(dtype, gate_kind, T, K, N, R, noncontiguous):
    g = torch.Generator().manual_seed(T * 1000 + K)
    adt = torch.float32 if dtype == torch.bfloat16 else dtype     # master weights stay fp32 under bf16
    x = randn(T, K, dtype=dtype, generator=g, noncontiguous=noncontiguous)
    w = randn(N, K, dtype=dtype, generator=g, scale=0.3)
    b = randn(N, dtype=dtype, generator=g)
    a = randn(R, K, dtype=adt, generator=g, scale=0.3)
    bb = randn(N, R, dtype=adt, generator=g, scale=0.3)
    gate = {"none": None, "rank": torch.rand(R, dtype=adt, generator=g),
            "token": torch.rand(T, R, dtype=adt, generator=g)}[gate_kind]
    dy = randn(T, N, dtype=dtype, generator=g)
    return x, w, b, a, bb, gate, dy


def _f64(t):
    return None if t is None else t.detach().to(torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate_kind", ["none", "rank", "token"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_forward_backward_match_reference(dtype, gate_kind, dropout_p, size, noncontiguous):
    x, w, b, a, bb, gate, dy = _case(dtype, gate_kind, *size, noncontiguous)
    scale, seed = 1.75, 1234
    y, h = cpu_fast.gated_lora_forward(x, w, b, a, bb, scale, gate, dropout_p, seed)
    y_ref, h_ref = reference.gated_lora_forward(_f64(x), _f64(w), _f64(b), _f64(a), _f64(bb), scale, _f64(gate),
                                                dropout_p, seed)
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, "y")
    assert_close(h, h_ref, dtype, "h")
    got = cpu_fast.gated_lora_backward(dy, x, w, a, bb, h, scale, gate, dropout_p, seed)
    want = reference.gated_lora_backward(_f64(dy), _f64(x), _f64(w), _f64(a), _f64(bb), h_ref, scale, _f64(gate),
                                         dropout_p, seed)
    for name, u, v, like in zip(("dx", "dA", "dB", "dG"), got, want, (x, a, bb, gate)):
        if like is None:
            assert u is None and v is None, name
            continue
        assert u.dtype == like.dtype and u.shape == like.shape, name
        assert_close(u, v, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, True, False),
                                   (False, False, False, True), (True, True, False, True)])
def test_partial_needs(dtype, needs):
    x, w, b, a, bb, gate, dy = _case(dtype, "token", 13, 11, 9, 5, False)
    _, h = cpu_fast.gated_lora_forward(x, w, b, a, bb, 0.5, gate)
    got = cpu_fast.gated_lora_backward(dy, x, w, a, bb, h, 0.5, gate, needs=needs)
    want = reference.gated_lora_backward(_f64(dy), _f64(x), _f64(w), _f64(a), _f64(bb), _f64(h), 0.5, _f64(gate),
                                         needs=needs)
    for name, need, u, v in zip(("dx", "dA", "dB", "dG"), needs, got, want):
        assert (u is None) == (not need), name
        if need:
            assert_close(u, v, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate_kind", ["none", "rank"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_accumulation_buffers(dtype, gate_kind, dropout_p):
    x, w, b, a, bb, gate, dy = _case(dtype, gate_kind, 67, 48, 40, 8, True)
    buf_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    start_a = randn(*a.shape, dtype=buf_dtype)
    start_b = randn(*bb.shape, dtype=buf_dtype)
    acc_a, acc_b = start_a.clone(), start_b.clone()
    _, h = cpu_fast.gated_lora_forward(x, w, b, a, bb, 2.0, gate, dropout_p, 9)
    got = cpu_fast.gated_lora_backward(dy, x, w, a, bb, h, 2.0, gate, dropout_p, 9, accum_a=acc_a, accum_b=acc_b)
    assert got[1] is None and got[2] is None
    _, da, db, _ = reference.gated_lora_backward(_f64(dy), _f64(x), _f64(w), _f64(a), _f64(bb), _f64(h), 2.0,
                                                 _f64(gate), dropout_p, 9)
    assert acc_a.dtype == buf_dtype and acc_b.dtype == buf_dtype
    assert_close(acc_a, _f64(start_a) + da, dtype, "accum_a")
    assert_close(acc_b, _f64(start_b) + db, dtype, "accum_b")


def test_cpu_tensors_take_the_cpu_backend_unless_forced(monkeypatch):
    """The dispatcher picks the cpu backend for CPU tensors; LORA_KERNELS_BACKEND=torch forces the reference."""
    from lora_kernels.dispatch import Problem
    x = torch.randn(4, 3)
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    name, impl = gated.select_backend(x, None, 0.0)
    assert name == "cpu" and impl.gated_lora_forward is cpu_fast.gated_lora_forward
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    name, impl = gated.select_backend(x, None, 0.0)
    assert name == "torch" and impl.gated_lora_forward is reference.gated_lora_forward
    assert not cpu_fast.supports(Problem("gated_lora", torch.device("meta"), torch.float32, 2))[0]


def test_layer_gradients_equal_with_and_without_cpu_fast(monkeypatch):
    """End to end through LoRALinear's autograd: the fast path and the reference give the same gradients."""
    from python_api import LoRALinear
    from lora_kernels.gated_lora import lora_linear
    torch.manual_seed(0)
    layer = LoRALinear(24, 20, r=6, alpha=12, dropout=0.2)
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    layer.set_rank_mask([1, 1, 0, 1, 0, 1])
    x = torch.randn(3, 7, 24, dtype=torch.float32)
    results = []
    for backend in ("auto", "torch"):
        monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
        xx = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        gate, active = layer.op_gate()
        y = lora_linear(xx, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, gate, 0.2,
                        True, active=active, seed=5)
        y.square().sum().backward()
        results.append((y.detach(), xx.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    for name, u, v in zip(("y", "dx", "dA", "dB"), *results):
        assert_close(u, v.double(), torch.float32, name)
