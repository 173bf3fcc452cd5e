"""Property tests of the gated LoRA op (issue #14): every generated call either raises a clear error of the
documented type naming the argument, or returns — with its gradients — the float64 reference
(:func:`lora_kernels.gated_lora.reference.lora_linear_ref` through autograd) within the per-dtype tolerance of
tests/helpers.py. Shapes include zero-size T and K, every gate kind (None, [R] values or 0/1 mask, [T, R]), dropout,
train/eval, non-contiguous inputs, fp32/fp64/bf16 (bf16 with fp32 master adapters). Torch backend.
Profiles (tests/conftest.py): "ci" 200 cases per property, "nightly" 2000 (``HYPOTHESIS_PROFILE=nightly``).
"""
from __future__ import annotations

import math

import pytest
import torch

from lora_kernels.gated_lora import lora_linear
from lora_kernels.gated_lora.reference import lora_linear_ref
from tests.helpers import assert_close

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")   # tests/conftest.py


def _t(shape, dtype, seed, noncontig=False, positive=False):
    g = torch.Generator().manual_seed(seed)
    if noncontig and len(shape) and shape[-1]:
        big = torch.randn(*shape[:-1], shape[-1] * 2, generator=g, dtype=torch.float64)[..., ::2]
    else:
        big = torch.randn(*shape, generator=g, dtype=torch.float64)
    if positive:
        big = big.abs() + 0.1
    return big.to(dtype)   # a strided view stays strided


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    lead = tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=2)))
    K, N, R = draw(st.integers(0, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 4))
    T = math.prod(lead)
    gate_kind = draw(st.sampled_from(["none", "values", "mask", "token"]))
    p = draw(st.sampled_from([0.0, 0.0, 0.25, 0.6]))
    return {
        "dtype": dtype, "lead": lead, "K": K, "N": N, "R": R, "T": T, "gate_kind": gate_kind, "p": p,
        "training": draw(st.booleans()), "bias": draw(st.booleans()), "noncontig": draw(st.booleans()),
        "scale": draw(st.sampled_from([0.5, 2.0, -1.0, 0.0])), "seed": draw(st.integers(0, 2**40)),
        "mask": draw(st.lists(st.booleans(), min_size=R, max_size=R)),
        "gate_grad": draw(st.booleans()), "data_seed": draw(st.integers(0, 2**16)),
    }


def _tensors(pb):
    dt, K, N, R, T = pb["dtype"], pb["K"], pb["N"], pb["R"], pb["T"]
    adt = torch.float32 if dt == torch.bfloat16 else dt           # fp32 master adapters for a bf16 base
    s = pb["data_seed"]
    x = _t((*pb["lead"], K), dt, s, pb["noncontig"])
    w = _t((N, K), dt, s + 1)
    b = _t((N,), dt, s + 2) if pb["bias"] else None
    a = _t((R, K), adt, s + 3, pb["noncontig"])
    bb = _t((N, R), adt, s + 4) * 0.5
    gate = None
    if pb["gate_kind"] == "values":
        gate = _t((R,), adt, s + 5)
    elif pb["gate_kind"] == "mask":
        gate = torch.tensor(pb["mask"], dtype=adt)
    elif pb["gate_kind"] == "token":
        gate = _t((T, R), adt, s + 6)
    return x, w, b, a, bb, gate


def _reference(x, w, b, a, bb, gate, scale, p, seed, dy):
    """(y, grads of x, a, b, gate) in fp64 through autograd of the reference; gradients of a loss <dy, y>."""
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, a, bb, gate)]
    y = lora_linear_ref(leaves[0], w.double(), None if b is None else b.double(), leaves[1], leaves[2], scale,
                        leaves[3], p, seed)
    (y * dy).sum().backward()
    return y.detach(), [None if t is None else t.grad for t in leaves]


@given(problems())
def test_lora_linear_matches_float64_reference(pb):
    x, w, b, a, bb, gate = _tensors(pb)
    p = pb["p"] if pb["training"] else 0.0
    need_gate_grad = gate is not None and pb["gate_grad"] and pb["gate_kind"] != "mask"
    xs = x.detach().requires_grad_(True)
    a_, b_ = a.detach().requires_grad_(True), bb.detach().requires_grad_(True)
    g_ = None if gate is None else gate.detach().requires_grad_(need_gate_grad)
    y = lora_linear(xs, w, b, a_, b_, pb["scale"], g_, pb["p"], pb["training"], seed=pb["seed"])
    assert y.dtype == x.dtype and y.shape == (*pb["lead"], pb["N"])
    dy = _t(tuple(y.shape), torch.float64, pb["data_seed"] + 9)
    want, wgrads = _reference(x, w, b, a, bb, gate, pb["scale"], p, pb["seed"], dy)
    # Σ|terms| of the same problem: the magnitude a rounding error is relative to (terms may cancel).
    absn = [None if t is None else t.abs() for t in (x, w, b, a, bb, gate)]
    mag, mgrads = _reference(absn[0], absn[1], absn[2], absn[3], absn[4], absn[5], abs(pb["scale"]), p, pb["seed"],
                             dy.abs())
    assert_close(y, want, pb["dtype"], name="y", scale=float(mag.max()) if mag.numel() else None)
    (y.double() * dy).sum().backward()
    got = [xs.grad, a_.grad, b_.grad, g_.grad if need_gate_grad else None]
    for name, gt, wt, mt in zip(("dx", "dA", "dB", "dG"), got, wgrads, mgrads):
        if name == "dG" and not need_gate_grad:
            continue
        if wt is None:
            continue
        assert gt is not None, f"{name} missing"
        assert_close(gt, wt, pb["dtype"], name=name, scale=float(mt.max()) if mt.numel() else None)


# ---- invalid arguments: a clear error of the documented type naming the argument ---------------------------------
CORRUPTIONS = {
    # name: (error type, text the message must contain, how to corrupt the valid arguments)
    "x_none": (TypeError, "x must be a torch.Tensor", lambda k: k.update(x=None)),
    "x_list": (TypeError, "x must be a torch.Tensor", lambda k: k.update(x=k["x"].tolist())),
    "x_int": (TypeError, "x must be a floating tensor", lambda k: k.update(x=k["x"].long())),
    "x_features": (ValueError, "x has", lambda k: k.update(x=torch.zeros(2, k["w"].shape[1] + 1))),
    "weight_1d": (ValueError, "weight must have 2 dims", lambda k: k.update(w=k["w"].flatten())),
    "weight_dtype": (TypeError, "weight has dtype", lambda k: k.update(w=k["w"].double() if k["x"].dtype !=
                                                                   torch.float64 else k["w"].float())),
    "lora_a_shape": (ValueError, "lora_a must be", lambda k: k.update(a=torch.zeros(k["a"].shape[0], 99))),
    "lora_b_shape": (ValueError, "lora_b must be", lambda k: k.update(bb=k["bb"][:, :0])),
    "lora_b_dtype": (TypeError, "lora_a .* and lora_b .* must share one dtype",
                     lambda k: k.update(bb=k["bb"].to(torch.float16))),
    "bias_shape": (ValueError, "bias must be", lambda k: k.update(b=torch.zeros(k["w"].shape[0] + 1,
                                                                                dtype=k["x"].dtype))),
    "gate_len": (ValueError, "gate .*length", lambda k: k.update(g=torch.ones(k["a"].shape[0] + 1))),
    "gate_token": (ValueError, "gate .*per-token", lambda k: k.update(g=torch.ones(k["T"] + 1, k["a"].shape[0]))),
    "gate_3d": (ValueError, "gate must have 1 or 2 dims", lambda k: k.update(g=torch.ones(1, 1, 1))),
    "scale_nan": (ValueError, "scale must be finite", lambda k: k.update(s=float("nan"))),
    "scale_inf": (ValueError, "scale must be finite", lambda k: k.update(s=-float("inf"))),
    "scale_str": (TypeError, "scale must be a Python number", lambda k: k.update(s="1")),
    "dropout_one": (ValueError, "dropout_p must be in", lambda k: k.update(p=1.0)),
    "dropout_neg": (ValueError, "dropout_p must be in", lambda k: k.update(p=-0.1)),
    "dropout_nan": (ValueError, "dropout_p must be finite", lambda k: k.update(p=float("nan"))),
    "seed_big": (ValueError, "seed must be an int in", lambda k: k.update(seed=2**70, p=0.1)),
    "seed_float": (TypeError, "seed must be an int in", lambda k: k.update(seed=0.5, p=0.1)),
    "active_contradicts": (ValueError, "active", lambda k: k.update(g=torch.ones(k["a"].shape[0]),
                                                                    active=torch.tensor([0] * 9))),
    "active_range": (ValueError, "active holds rank indices outside",
                     lambda k: k.update(g=torch.ones(k["a"].shape[0]), active=torch.tensor([k["a"].shape[0]]))),
    "weight_grad": (ValueError, "weight requires grad", lambda k: k.update(w=k["w"].requires_grad_(True))),
}


@given(problems(), st.sampled_from(sorted(CORRUPTIONS)))
def test_lora_linear_invalid_argument_is_a_clear_error(pb, which):
    pb = {**pb, "dtype": torch.float32 if pb["dtype"] == torch.bfloat16 else pb["dtype"], "K": max(pb["K"], 1)}
    x, w, b, a, bb, gate = _tensors(pb)
    if pb["gate_kind"] == "token" and which.startswith("active"):
        gate = None
    k = {"x": x, "w": w, "b": b, "a": a, "bb": bb, "g": gate, "s": pb["scale"], "p": 0.0, "seed": None,
         "active": None, "T": pb["T"]}
    err, text, corrupt = CORRUPTIONS[which]
    corrupt(k)
    with pytest.raises(err, match=text):
        lora_linear(k["x"], k["w"], k["b"], k["a"], k["bb"], k["s"], k["g"], k["p"], True, active=k["active"],
                    seed=k["seed"])
