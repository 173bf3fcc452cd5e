"""Triton backend of the gated LoRA linear vs the float64 reference (run with TRITON_INTERPRET=1 on CPU).

Every launch runs inside ``_alloc.poisoned_outputs()``: outputs start as NaN, so a missed element fails.
Small tiles (16/32) make the small shapes below span several tiles, rank chunks and partial edges.
"""
from __future__ import annotations

import pytest
import torch

from lora_kernels import _alloc
from lora_kernels.gated_lora import reference
from lora_kernels.dispatch import Problem
from tests.helpers import assert_close, randn

tg = pytest.importorskip("lora_kernels.gated_lora.triton", reason="triton is not importable")

SMALL_TILES = {"gemm_m": 16, "gemm_n": 32, "gemm_k": 32, "gemm_r_max": 16, "group_m": 2, "skinny_t": 16, "skinny_k": 32,
                   "skinny_r_max": 32, "gemm_warps": 4}
HALF = (torch.float16, torch.bfloat16)
# The interpreter converts loop bounds with a numpy call deprecated in numpy 1.25; not our code.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.fixture(autouse=True)
def _small_tiles(triton_backend, monkeypatch):
    # triton_backend skips the module's tests with the reason when triton cannot run here.
    monkeypatch.setattr(tg, "TILES", tg.Tiles(**SMALL_TILES))


def _d(t):
    return None if t is None else t.detach().double()


def make(T, K, N, R, dtype=torch.float32, adapter_dtype=None, gate="none", bias=True, seed=0, gate_zeros=False):
    g = torch.Generator().manual_seed(seed)
    ad = adapter_dtype or dtype
    args = {
        "x": randn(T, K, dtype=dtype, generator=g),
        "weight": randn(N, K, dtype=dtype, generator=g, scale=K ** -0.5),
        "bias": randn(N, dtype=dtype, generator=g) if bias else None,
        "lora_a": randn(R, K, dtype=ad, generator=g, scale=K ** -0.5),
        "lora_b": randn(N, R, dtype=ad, generator=g, scale=R ** -0.5),
        "gate": None,
    }
    if gate == "rank":
        args["gate"] = randn(R, dtype=ad, generator=g)
        if gate_zeros:
            args["gate"][::2] = 0
    elif gate == "token":
        args["gate"] = randn(T, R, dtype=ad, generator=g)
    dy = randn(T, N, dtype=dtype, generator=g)
    return args, dy


def run_both(args, dy, scale=0.7, p=0.0, seed=1234, needs=(True, True, True, True)):
    """Triton (poisoned outputs) and the float64 reference on the same inputs."""
    with _alloc.poisoned_outputs():
        y, h = tg.gated_lora_forward(**args, scale=scale, dropout_p=p, seed=seed)
        grads = tg.gated_lora_backward(dy, args["x"], args["weight"], args["lora_a"], args["lora_b"], h, scale,
                                       args["gate"], p, seed, needs)
    a64 = {k: _d(v) for k, v in args.items()}
    ye, he = reference.gated_lora_forward(**a64, scale=scale, dropout_p=p, seed=seed)
    ge = reference.gated_lora_backward(_d(dy), a64["x"], a64["weight"], a64["lora_a"], a64["lora_b"], he, scale,
                                       a64["gate"], p, seed, needs)
    return (y, h, *grads), (ye, he, *ge)


def check_all(args, dy, **kw):
    got, exp = run_both(args, dy, **kw)
    dt = args["x"].dtype
    y, h = got[:2]
    assert y.dtype == dt and h.dtype == torch.float32
    for name, a, e in zip(("y", "h", "dx", "dA", "dB", "dG"), got, exp):
        if e is None:
            assert a is None, f"{name} should be None"
            continue
        assert_close(a, e, dt, name=name)
    dx, da, db, dg = got[2:]
    if dx is not None:
        assert dx.dtype == dt
    if da is not None:
        assert da.dtype == args["lora_a"].dtype
    if db is not None:
        assert db.dtype == args["lora_b"].dtype
    if dg is not None:
        assert dg.dtype == args["gate"].dtype and dg.shape == args["gate"].shape


# ----------------------------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("seed,p", [(0, 0.1), (1234, 0.5), (2**31 + 7, 0.3), (2**32 + 5, 0.9), (99, 0.0)])
def test_dropout_mask_bit_exact(seed, p):
    T, K = 45, 70
    got = tg.dropout_keep_mask(seed, T, K, p, "cpu")
    exp = reference.dropout_keep(seed, torch.arange(T).unsqueeze(1), torch.arange(K).unsqueeze(0), p)
    assert torch.equal(got, exp)


# ------------------------------------------------------------------------------------ forward + backward

@pytest.mark.parametrize("gate", ["none", "rank", "token"])
@pytest.mark.parametrize("R", [1, 5, 16, 33])
def test_fp32_odd_sizes(gate, R):
    args, dy = make(37, 45, 29, R, gate=gate, seed=R)
    check_all(args, dy)


@pytest.mark.parametrize("gate", ["none", "rank", "token"])
def test_dropout_same_mask_as_reference(gate):
    args, dy = make(37, 45, 29, 5, gate=gate, seed=3)
    check_all(args, dy, p=0.3, seed=2**31 + 11)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("gate", ["none", "rank", "token"])
def test_half(dtype, gate):
    args, dy = make(37, 45, 29, 5, dtype=dtype, gate=gate, seed=5)
    check_all(args, dy, p=0.2 if gate == "token" else 0.0)


@pytest.mark.parametrize("dtype", HALF)
def test_mixed_fp32_adapters(dtype):
    args, dy = make(37, 45, 29, 16, dtype=dtype, adapter_dtype=torch.float32, gate="token", seed=6)
    check_all(args, dy)


def test_below_tile_no_bias():
    args, dy = make(3, 5, 7, 2, gate="rank", bias=False, seed=7)
    check_all(args, dy)


def test_rank_gate_with_zeros_keeps_gate_gradient():
    args, dy = make(37, 45, 29, 6, gate="rank", gate_zeros=True, seed=8)
    got, _ = run_both(args, dy)
    assert got[5][::2].abs().min() > 0, "dG at switched-off ranks must be computed (ALGORITHMS.md §1)"
    check_all(args, dy)


def test_non_contiguous_inputs():
    args, dy = make(37, 45, 29, 5, gate="token", seed=9)
    args["x"] = args["x"].t().contiguous().t()                 # column-major [T, K]
    args["weight"] = randn(29, 45, noncontiguous=True, scale=0.2)
    args["lora_a"] = args["lora_a"].t().contiguous().t()
    args["lora_b"] = randn(29, 5, noncontiguous=True, scale=0.4)
    args["gate"] = randn(37, 5, noncontiguous=True)
    dy = randn(37, 29, noncontiguous=True)
    assert not args["x"].is_contiguous() and not dy.is_contiguous()
    check_all(args, dy, p=0.25)


@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, False, False),
                                   (False, False, True, False), (False, False, False, True),
                                   (False, True, True, False)])
def test_needs_subsets(needs):
    args, dy = make(37, 45, 29, 5, gate="token", seed=10)
    check_all(args, dy, needs=needs, p=0.1)


def test_accumulate_into_shared_buffers():
    args, dy = make(37, 45, 29, 5, dtype=torch.bfloat16, adapter_dtype=torch.float32, gate="rank", seed=11)
    acc_a = randn(5, 45, generator=torch.Generator().manual_seed(1))
    acc_b = randn(29, 5, generator=torch.Generator().manual_seed(2))
    start_a, start_b = acc_a.clone(), acc_b.clone()
    with _alloc.poisoned_outputs():
        _, h = tg.gated_lora_forward(**args, scale=0.5)
        dx, da, db, dg = tg.gated_lora_backward(dy, args["x"], args["weight"], args["lora_a"], args["lora_b"], h,
                                                0.5, args["gate"], accum_a=acc_a, accum_b=acc_b)
    assert da is None and db is None and dx is not None and dg is not None
    a64 = {k: _d(v) for k, v in args.items()}
    _, he = reference.gated_lora_forward(**a64, scale=0.5)
    _, ea, eb, _ = reference.gated_lora_backward(_d(dy), a64["x"], a64["weight"], a64["lora_a"], a64["lora_b"],
                                                 he, 0.5, a64["gate"])
    assert_close(acc_a, _d(start_a) + ea, torch.bfloat16, name="accum_a")
    assert_close(acc_b, _d(start_b) + eb, torch.bfloat16, name="accum_b")


def test_empty_batch():
    args, dy = make(0, 45, 29, 5, gate="token", seed=12)
    y, h = tg.gated_lora_forward(**args, scale=1.0)
    assert y.shape == (0, 29) and h.shape == (0, 5)
    dx, da, db, dg = tg.gated_lora_backward(dy, args["x"], args["weight"], args["lora_a"], args["lora_b"], h, 1.0,
                                            args["gate"])
    assert dx.shape == (0, 45) and dg.shape == (0, 5)
    assert torch.equal(da, torch.zeros(5, 45)) and torch.equal(db, torch.zeros(29, 5))


# ------------------------------------------------------------------------------------------ validation

def test_supports_names_the_reason():
    # Argument validation happens once, at the op boundary (tests/lora_kernels/test_cuda_wrappers.py,
    # tests/python_api/test_lora_linear.py); the backend only says what it cannot run and why.
    ok, why = tg.supports(Problem("gated_lora", torch.device("cpu"), torch.float64, 4))
    assert not ok and "float64" in why
    assert tg.supports(Problem("gated_lora", torch.device("cpu"), torch.bfloat16, 4, "token", True))[0]


# ---------------------------------------------------------------------------------- through python_api

def test_public_path_3d_and_non_contiguous(monkeypatch):
    from python_api import lora_linear
    calls = []
    for fn in ("gated_lora_forward", "gated_lora_backward"):
        orig = getattr(tg, fn)
        monkeypatch.setattr(tg, fn, lambda *a, _o=orig, _n=fn, **k: calls.append(_n) or _o(*a, **k))
    g = torch.Generator().manual_seed(13)
    x = randn(2, 11, 45 * 2, generator=g)[..., ::2].requires_grad_()       # [2, 11, 45], non-contiguous
    args, _ = make(22, 45, 29, 5, gate="token", seed=13)
    a = args["lora_a"].requires_grad_()
    b = args["lora_b"].requires_grad_()
    gate = args["gate"].requires_grad_()
    y = lora_linear(x, args["weight"], args["bias"], a, b, 0.5, gate, dropout_p=0.2, seed=77)
    w = randn(*y.shape, generator=g)
    (y * w).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (x, a, b, gate)]
    ye = reference.lora_linear_ref(leaves[0], _d(args["weight"]), _d(args["bias"]), *leaves[1:3], 0.5, leaves[3],
                                   dropout_p=0.2, seed=77)
    (ye * w.double()).sum().backward()
    assert calls == ["gated_lora_forward", "gated_lora_backward"], "LORA_KERNELS_BACKEND=triton was not used"
    assert_close(y, ye, torch.float32, name="y")
    for name, t, e in zip(("dx", "dA", "dB", "dG"), (x, a, b, gate), leaves):
        assert_close(t.grad, e.grad, torch.float32, name=name)


@pytest.mark.parametrize("gate_kind", ["rank", "token"])
def test_directional_derivatives_match_finite_differences(gate_kind):
    # float64 is refused by this backend, so torch.autograd.gradcheck cannot run: y is linear in each of
    # x, A, B, G separately, so a central difference with a unit step is exact up to fp32 rounding.
    from python_api import lora_linear
    args, _ = make(9, 20, 13, 4, gate=gate_kind, seed=14)
    g = torch.Generator().manual_seed(15)
    w = randn(9, 13, generator=g, dtype=torch.float64)
    names = ("x", "lora_a", "lora_b", "gate")
    leaves = {k: args[k].clone().requires_grad_() for k in names}

    def loss(**over):
        kw = {**args, **leaves, **over}
        y = lora_linear(kw["x"], kw["weight"], kw["bias"], kw["lora_a"], kw["lora_b"], 0.5, kw["gate"],
                        dropout_p=0.3, seed=5)
        return (y.double() * w).sum(), (y.double().abs() * w.abs()).sum()

    loss()[0].backward()
    for k in names:
        d = randn(*args[k].shape, generator=g)
        with torch.no_grad():
            fp, mp = loss(**{k: leaves[k] + d})
            fm, mm = loss(**{k: leaves[k] - d})
        fd = (fp - fm) / 2
        analytic = (leaves[k].grad.double() * d.double()).sum()
        assert_close(fd.reshape(1), analytic.reshape(1), torch.float32, name=f"d/d{k}", scale=float(mp + mm))
