"""The gated LoRA op through the public path (python_api.lora_linear) on the torch backend, against
the float64 autograd oracle; the Triton backend has its own file with the same grid."""
import pytest
import torch

import python_api
from lora_kernels.gated_lora import reference
from tests.helpers import assert_close, randn

GATES = ["none", "rank", "rank_zeros", "token"]


def make_gate(kind, T, R, dtype=torch.float64, gen=None):
    if kind == "none":
        return None
    if kind == "rank":
        return randn(R, dtype=dtype, generator=gen)
    if kind == "rank_zeros":
        g = (torch.rand(R, generator=gen) > 0.5).to(dtype)
        g[0] = 1.0
        return g
    return randn(T, R, dtype=dtype, generator=gen)


def oracle(x, w, b, a, bb, s, g, p, seed):
    """float64 autograd through the readable formula; returns y and grads of (x, a, b, g)."""
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, a, bb, g)]
    xd, ad, bd, gd = leaves
    y = reference.lora_linear_ref(xd, w.double(), b.double() if b is not None else None, ad, bd, s, gd, p, seed)
    return y, leaves


@pytest.mark.parametrize("gate_kind", GATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (37, 45, 29, 5), (2 * 7, 64, 33, 16)])
def test_matches_oracle(shape, dtype, gate_kind):
    T, K, N, R = shape
    gen = torch.Generator().manual_seed(hash((shape, str(dtype), gate_kind)) % 2**31)
    x = randn(T, K, dtype=dtype, generator=gen)
    w = randn(N, K, dtype=dtype, generator=gen, scale=K ** -0.5)
    b = randn(N, dtype=dtype, generator=gen)
    a = randn(R, K, dtype=torch.float32 if dtype == torch.bfloat16 else dtype, generator=gen, scale=K ** -0.5)
    bb = randn(N, R, dtype=a.dtype, generator=gen)
    g = make_gate(gate_kind, T, R, a.dtype, gen)
    xs, as_, bs = (t.clone().requires_grad_(True) for t in (x, a, bb))
    gs = g.clone().requires_grad_(gate_kind in ("rank", "token")) if g is not None else None
    y = python_api.lora_linear(xs, w, b, as_, bs, 0.7, gs)
    dy = randn(T, N, dtype=dtype, generator=gen)
    y.backward(dy)
    y_ref, (xr, ar, br, gr) = oracle(x, w, b, a, bb, 0.7, g, 0.0, 0)
    y_ref.backward(dy.double())
    # Error bounds scale with Σ|terms| (the same problem on absolute values), not with the result,
    # which can cancel: a bf16 rounding of each term is then visible.
    absv = [t.abs() if t is not None else None for t in (x, w, b, a, bb, g)]
    y_abs, (xa, aa, ba, ga) = oracle(absv[0], absv[1], absv[2], absv[3], absv[4], 0.7, absv[5], 0.0, 0)
    y_abs.backward(dy.double().abs())
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "y", scale=float(y_abs.max()))
    assert_close(xs.grad, xr.grad, dtype, "dx", scale=float(xa.grad.max()))
    assert_close(as_.grad, ar.grad, dtype, "dA", scale=float(aa.grad.max()))
    assert_close(bs.grad, br.grad, dtype, "dB", scale=float(ba.grad.max()))
    if gs is not None and gs.requires_grad:
        assert_close(gs.grad, gr.grad, dtype, "dG", scale=float(ga.grad.max()))


def test_three_d_and_noncontiguous_input():
    gen = torch.Generator().manual_seed(0)
    x = randn(3, 5, 20, generator=gen, noncontiguous=True)
    assert not x.is_contiguous()
    w, a, bb = randn(11, 20, generator=gen), randn(4, 20, generator=gen), randn(11, 4, generator=gen)
    g = randn(15, 4, generator=gen)
    xs = x.clone().requires_grad_(True)
    y = python_api.lora_linear(x.requires_grad_(True), w, None, a, bb, 2.0, g)
    assert y.shape == (3, 5, 11)
    y_ref = reference.lora_linear_ref(xs, w, None, a, bb, 2.0, g)
    assert_close(y, y_ref.double(), torch.float32, "y")
    y.sum().backward()
    y_ref.sum().backward()
    assert_close(x.grad, xs.grad.double(), torch.float32, "dx")


@pytest.mark.parametrize("gate_kind", ["none", "rank", "token"])
def test_gradcheck_float64(gate_kind):
    gen = torch.Generator().manual_seed(1)
    T, K, N, R = 5, 6, 4, 3
    x = randn(T, K, dtype=torch.float64, generator=gen).requires_grad_(True)
    w, b = randn(N, K, dtype=torch.float64, generator=gen), randn(N, dtype=torch.float64, generator=gen)
    a = randn(R, K, dtype=torch.float64, generator=gen).requires_grad_(True)
    bb = randn(N, R, dtype=torch.float64, generator=gen).requires_grad_(True)
    g = make_gate(gate_kind, T, R, torch.float64, gen)
    inputs = [x, a, bb] + ([g.requires_grad_(True)] if g is not None else [])

    def f(x, a, bb, *rest):
        return python_api.lora_linear(x, w, b, a, bb, 0.5, rest[0] if rest else None)

    assert torch.autograd.gradcheck(f, inputs)


def test_dropout_mask_regenerated_and_consistent():
    gen = torch.Generator().manual_seed(2)
    T, K, N, R, p = 8, 6, 3, 2, 0.3
    x = randn(T, K, dtype=torch.float64, generator=gen).requires_grad_(True)
    w = randn(N, K, dtype=torch.float64, generator=gen)
    a = randn(R, K, dtype=torch.float64, generator=gen).requires_grad_(True)
    bb = randn(N, R, dtype=torch.float64, generator=gen).requires_grad_(True)
    # forward/backward use the same mask: gradcheck passes with dropout on (fixed seed)
    assert torch.autograd.gradcheck(
        lambda x, a, bb: python_api.lora_linear(x, w, None, a, bb, 1.0, dropout_p=p, seed=1234), [x, a, bb])
    # statistics of the mask: keep rate ≈ 1 − p and inverted scaling keeps the mean
    m = reference.dropout_mask(99, 256, 256, p)
    keep = (m > 0).double().mean().item()
    assert abs(keep - (1 - p)) < 0.01
    assert abs(m.double().mean().item() - 1.0) < 0.02
    # different seeds give different masks; eval mode switches dropout off
    assert not torch.equal(reference.dropout_mask(1, 8, 8, p), reference.dropout_mask(2, 8, 8, p))
    y_eval = python_api.lora_linear(x, w, None, a, bb, 1.0, dropout_p=p, training=False)
    y_nodrop = python_api.lora_linear(x, w, None, a, bb, 1.0)
    assert torch.equal(y_eval, y_nodrop)


def test_dropout_seed_follows_torch_rng():
    x, w, a, bb = torch.randn(16, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
    torch.manual_seed(5)
    y1 = python_api.lora_linear(x, w, None, a, bb, 1.0, dropout_p=0.5)
    torch.manual_seed(5)
    y2 = python_api.lora_linear(x, w, None, a, bb, 1.0, dropout_p=0.5)
    assert torch.equal(y1, y2)


def test_all_ranks_masked_and_empty_batch():
    w, b = torch.randn(6, 5), torch.randn(6)
    a = torch.randn(3, 5, requires_grad=True)
    bb = torch.randn(6, 3, requires_grad=True)
    x = torch.randn(4, 5, requires_grad=True)
    y = python_api.lora_linear(x, w, b, a, bb, 1.0, torch.zeros(3))
    assert torch.allclose(y, x @ w.t() + b)
    y.sum().backward()
    assert torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(bb.grad) == 0
    assert torch.allclose(x.grad, torch.ones(4, 6) @ w)
    empty = torch.randn(0, 7, 5, requires_grad=True)
    ye = python_api.lora_linear(empty, w, b, a, bb, 1.0)
    assert ye.shape == (0, 7, 6)
    ye.sum().backward()
    assert empty.grad.shape == empty.shape


def test_masked_ranks_equal_dense_rank_k_and_zero_grads():
    gen = torch.Generator().manual_seed(3)
    x, w = randn(9, 12, generator=gen), randn(7, 12, generator=gen)
    a = randn(6, 12, generator=gen).requires_grad_(True)
    bb = randn(7, 6, generator=gen).requires_grad_(True)
    mask = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.float32)
    y = python_api.lora_linear(x, w, None, a, bb, 1.5, mask)
    keep = mask.bool()
    a_k = a.detach()[keep].clone().requires_grad_(True)
    b_k = bb.detach()[:, keep].clone().requires_grad_(True)
    y_k = python_api.lora_linear(x, w, None, a_k, b_k, 1.5)
    assert_close(y, y_k.double(), torch.float32, "y")
    y.sum().backward()
    y_k.sum().backward()
    assert torch.count_nonzero(a.grad[~keep]) == 0 and torch.count_nonzero(bb.grad[:, ~keep]) == 0
    assert_close(a.grad[keep], a_k.grad.double(), torch.float32, "dA")
    assert_close(bb.grad[:, keep], b_k.grad.double(), torch.float32, "dB")


def test_trainable_gate_keeps_gradient_of_switched_off_ranks():
    # dG_i = Σ_t dZ[t,i]·H[t,i] is non-zero at a rank whose gate is 0 (ALGORITHMS.md §1)
    gen = torch.Generator().manual_seed(4)
    x, w = randn(9, 12, generator=gen), randn(7, 12, generator=gen)
    a, bb = randn(4, 12, generator=gen), randn(7, 4, generator=gen)
    g = torch.tensor([1.0, 0.0, 2.0, 0.0], requires_grad=True)
    python_api.lora_linear(x, w, None, a, bb, 1.0, g).square().sum().backward()
    assert torch.all(g.grad != 0)


def test_accumulate_into_shared_buffers():
    gen = torch.Generator().manual_seed(5)
    x, w = randn(10, 8, generator=gen), randn(6, 8, generator=gen)
    a = randn(3, 8, generator=gen).requires_grad_(True)
    bb = randn(6, 3, generator=gen).requires_grad_(True)
    acc_a, acc_b = torch.ones(3, 8), torch.ones(6, 3)
    python_api.lora_linear(x, w, None, a, bb, 0.5, accum_a=acc_a, accum_b=acc_b).sum().backward()
    assert a.grad is None and bb.grad is None
    a2, b2 = a.detach().clone().requires_grad_(True), bb.detach().clone().requires_grad_(True)
    python_api.lora_linear(x, w, None, a2, b2, 0.5).sum().backward()
    assert_close(acc_a, (a2.grad + 1).double(), torch.float32, "accum_a")
    assert_close(acc_b, (b2.grad + 1).double(), torch.float32, "accum_b")


def test_autocast_bf16_cpu():
    lin = torch.nn.Linear(32, 16)
    layer = python_api.LoRALinear.from_linear(lin, 4, 8)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_close(y, layer(x).double(), torch.bfloat16, "y autocast")
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(4, 7)), "x has 7 features"),
    (dict(lora_a=torch.randn(3, 6)), "lora_a must be"),
    (dict(lora_b=torch.randn(5, 2)), "lora_b must be"),
    (dict(bias=torch.randn(4)), "bias must be"),
    (dict(gate=torch.ones(4)), "gate .*length 4, expected R=3"),
    (dict(gate=torch.ones(5, 3)), r"gate \(per-token\) must be \[T, R\]"),
    (dict(x=torch.randn(4, 8, dtype=torch.float64)), "weight has dtype"),
    (dict(lora_b=torch.randn(5, 3, dtype=torch.float64)), "lora_a .* and lora_b"),
    (dict(x=torch.randint(0, 3, (4, 8))), "x must be a floating tensor"),
    (dict(dropout_p=1.0), "dropout_p"),
    (dict(x=torch.randn(4, 8, device="meta")), "weight is on cpu but x is on meta"),
])
def test_bad_input_names_argument(bad, match):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(5, 8), bias=torch.randn(5), lora_a=torch.randn(3, 8),
                lora_b=torch.randn(5, 3), scale=1.0, gate=None, dropout_p=0.0)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        python_api.lora_linear(**args)


def test_frozen_weight_required():
    w = torch.randn(5, 8, requires_grad=True)
    with pytest.raises(ValueError, match="weight requires grad"):
        python_api.lora_linear(torch.randn(2, 8), w, None, torch.randn(3, 8), torch.randn(5, 3), 1.0)
