"""Property tests of the adapter layers and surgery (issue #14): LoRALinear (every gate kind, masks, SVD form,
dropout, non-contiguous input), merge / unmerge, apply_adapters with every share variant and accumulation mode,
and MoELoRALinear. Each generated case either raises a clear error of the documented type naming the argument, or
equals the float64 reference (:func:`lora_kernels.gated_lora.reference.lora_linear_ref`) within the per-dtype
tolerance of tests/helpers.py. Torch backend. Profiles in tests/conftest.py ("ci": 200 cases per property).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import python_api as lk
from lora_kernels.gated_lora.reference import lora_linear_ref
from python_api.moe import MoELoRALinear
from python_api.surgery import adapter_layers
from tests.helpers import assert_close
from tests.python_api.toy_models import assert_shared_grads_are_sums, randomize_b, tie_like, toy

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")   # tests/conftest.py


def _rand(shape, dtype, seed, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    if noncontig and shape[-1]:
        return torch.randn(*shape[:-1], shape[-1] * 2, generator=g, dtype=torch.float64).to(dtype)[..., ::2]
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _d(t):
    return None if t is None else t.detach().double()


def _layer_ref(layer: lk.LoRALinear, x: torch.Tensor, token_gate, training: bool, seed: int, absval=False):
    """The layer's output from its parameters, in fp64 through the reference (``absval``: Σ|terms|)."""
    f = (lambda t: None if t is None else _d(t).abs()) if absval else _d
    g = None
    if layer.svd:
        g = f(layer.lora_E) * layer.rank_mask.double()
    elif not bool(layer.rank_mask.all()):
        g = layer.rank_mask.double()
    if token_gate is not None:
        g = f(token_gate) if g is None else f(token_gate) * g
    p = layer.dropout if training else 0.0
    return lora_linear_ref(f(x), f(layer.weight), f(layer.bias), f(layer.lora_A), f(layer.lora_B),
                           abs(layer.scaling) if absval else layer.scaling, g, p, seed)


@st.composite
def layers(draw):
    dtype = draw(st.sampled_from(DTYPES))
    K, N = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    r = draw(st.integers(1, min(K, N)))
    return {"dtype": dtype, "K": K, "N": N, "r": r, "svd": draw(st.booleans()), "bias": draw(st.booleans()),
            "alpha": draw(st.sampled_from([None, 1.0, 8.0, 0.5])), "dropout": draw(st.sampled_from([0.0, 0.3])),
            "mask": draw(st.lists(st.booleans(), min_size=r, max_size=r)), "token": draw(st.booleans()),
            "lead": tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=2))),
            "noncontig": draw(st.booleans()), "training": draw(st.booleans()), "seed": draw(st.integers(0, 2**16))}


def _build_layer(c):
    torch.manual_seed(c["seed"])
    layer = lk.LoRALinear(c["K"], c["N"], c["r"], alpha=c["alpha"], dropout=c["dropout"], bias=c["bias"],
                          svd=c["svd"], dtype=c["dtype"])
    with torch.no_grad():
        layer.lora_B.copy_(_rand(layer.lora_B.shape, torch.float64, c["seed"] + 1))
        if c["svd"]:
            layer.lora_E.copy_(_rand(layer.lora_E.shape, torch.float64, c["seed"] + 2))
    layer.set_rank_mask(c["mask"])
    layer.train(c["training"])
    return layer


@given(layers())
def test_lora_layer_matches_float64_reference(c):
    layer = _build_layer(c)
    x = _rand((*c["lead"], c["K"]), c["dtype"], c["seed"] + 3, c["noncontig"])
    T = x.numel() // c["K"]
    tg = _rand((T, c["r"]), layer.lora_A.dtype, c["seed"] + 4) if c["token"] else None
    layer.set_token_gate(tg)
    torch.manual_seed(c["seed"] + 5)   # the layer draws its dropout seed from torch's generator...
    y = layer(x)
    torch.manual_seed(c["seed"] + 5)   # ...exactly as the op does (new_dropout_seed)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    want = _layer_ref(layer, x, tg, c["training"], seed)
    mag = _layer_ref(layer, x, tg, c["training"], seed, absval=True)
    assert y.dtype == c["dtype"] and y.shape == (*c["lead"], c["N"])
    assert_close(y, want, c["dtype"], name="LoRALinear", scale=float(mag.max()) if mag.numel() else None)


@given(layers(), st.sampled_from(["layer", "merge_adapters", "merge_adapters_reversible"]))
def test_merge_equals_adapter_output_and_unmerge_is_bit_exact(c, how):
    layer = _build_layer({**c, "training": False})
    x = _rand((*c["lead"], c["K"]), c["dtype"], c["seed"] + 3, c["noncontig"])
    with torch.no_grad():
        y0 = layer(x)
        want = _layer_ref(layer, x, None, False, 0)
        mag = _layer_ref(layer, x, None, False, 0, absval=True)
        w0 = layer.weight.detach().clone()
        model = nn.Sequential(layer)
        if how == "layer":
            layer.merge()
        else:
            lk.merge_adapters(model, reversible=how.endswith("reversible"))
        assert_close(model(x), want, c["dtype"], name=f"merged ({how})",
                     scale=float(mag.max()) if mag.numel() else None)
        if how == "merge_adapters":
            return
        if how == "layer":
            layer.unmerge()
        else:
            lk.unmerge_adapters(model)
        assert model[0] is layer and torch.equal(layer.weight, w0)
        assert torch.equal(model(x), y0), "unmerge is not bit-exact"


@st.composite
def surgeries(draw):
    share = draw(st.sampled_from([None, "A", "B", "AB"]))
    return {"share": share, "scope": draw(st.sampled_from(["module_type", "attention"])),
            "accumulate": draw(st.sampled_from(["inplace", "autograd"])), "r": draw(st.integers(1, 4)),
            "alpha": draw(st.sampled_from([None, 2.0, 16.0])), "svd": draw(st.booleans()),
            "targets": draw(st.sampled_from([["q_proj"], ["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"], "layers\\.0\\..*_proj"])),
            "seed": draw(st.integers(0, 2**16)), "batch": draw(st.integers(0, 3)),
            "zero_grad": draw(st.sampled_from([None, True, False]))}


@given(surgeries())
def test_apply_adapters_share_variants_gradients_and_merge(c):
    # fp64: the shared model's output equals an unshared model holding the same values; the gradient of each
    # shared matrix is the sum of the per-layer gradients; merge / unmerge round-trips.
    kw = {"r": c["r"], "alpha": c["alpha"], "svd": c["svd"]}
    if c["share"]:
        kw.update(share=c["share"], share_scope=c["scope"], accumulate=c["accumulate"])
    s = lk.apply_adapters(toy(c["seed"], dtype=torch.float64, d=8, layers=2), c["targets"], **kw)
    randomize_b(s, c["seed"])
    for layer in adapter_layers(s).values():
        if layer.svd:
            with torch.no_grad():
                layer.lora_E.uniform_(0.5, 1.5)
    u = lk.apply_adapters(toy(c["seed"], dtype=torch.float64, d=8, layers=2), c["targets"], r=c["r"],
                          alpha=c["alpha"], svd=c["svd"])
    tie_like(u, s)
    for name, layer in adapter_layers(u).items():
        if layer.svd:
            with torch.no_grad():
                layer.lora_E.copy_(adapter_layers(s)[name].lora_E)
    x = _rand((c["batch"], 3, 8), torch.float64, c["seed"] + 7)
    ys, yu = s(x), u(x)
    assert_close(ys, yu.detach(), torch.float64, name="shared vs unshared output")
    if c["zero_grad"] is not None:   # the order some training loops use: zero_grad between forward and backward
        s.zero_grad(set_to_none=c["zero_grad"])
    ys.square().sum().backward()
    yu.square().sum().backward()
    assert_shared_grads_are_sums(s, u, torch.float64)
    with torch.no_grad():
        y0 = s(x)
        lk.merge_adapters(s, reversible=True)
        assert_close(s(x), y0, torch.float64, name="merged model")
        lk.unmerge_adapters(s)
        assert torch.equal(s(x), y0)


@st.composite
def moes(draw):
    dtype = draw(st.sampled_from(DTYPES))
    E = draw(st.integers(1, 4))
    return {"dtype": dtype, "K": draw(st.integers(1, 6)), "N": draw(st.integers(1, 6)), "E": E,
            "r": draw(st.integers(1, 3)), "top_k": draw(st.integers(1, E)), "bias": draw(st.booleans()),
            "alpha": draw(st.sampled_from([1.0, 4.0])), "T": draw(st.integers(0, 5)),
            "seed": draw(st.integers(0, 2**16)),
            "bad": draw(st.sampled_from([None, None, None, "alpha", "top_k", "num_experts", "x"]))}


@given(moes())
def test_moe_layer_matches_expert_sum(c):
    args = {"in_features": c["K"], "out_features": c["N"], "num_experts": c["E"], "r": c["r"], "alpha": c["alpha"],
            "top_k": c["top_k"], "bias": c["bias"], "dtype": c["dtype"]}
    bad = c["bad"]
    if bad in ("alpha", "top_k", "num_experts"):
        val = {"alpha": float("nan"), "top_k": c["E"] + 1, "num_experts": 0}[bad]
        with pytest.raises(ValueError, match=bad):
            MoELoRALinear(**{**args, bad: val})
        return
    torch.manual_seed(c["seed"])
    layer = MoELoRALinear(**args)
    with torch.no_grad():
        layer.lora_B.copy_(_rand(layer.lora_B.shape, torch.float64, c["seed"] + 1))
    if bad == "x":
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            layer(None)
        return
    x = _rand((c["T"], c["K"]), c["dtype"], c["seed"] + 2)
    y = layer(x)
    w, _, _ = layer.routing(x)                                          # [T, E], the layer's own routing
    assert bool(((w > 0).sum(1) <= c["top_k"]).all())
    xd = _d(x)
    want = xd @ _d(layer.weight).t() + (0 if layer.bias is None else _d(layer.bias))
    mag = xd.abs() @ _d(layer.weight).abs().t() + (0 if layer.bias is None else _d(layer.bias).abs())
    for e in range(c["E"]):
        a = _d(layer.lora_A[e * c["r"]:(e + 1) * c["r"]])
        b = _d(layer.lora_B[:, e * c["r"]:(e + 1) * c["r"]])
        we = _d(w[:, e:e + 1])
        want = want + layer.scaling * we * ((xd @ a.t()) @ b.t())
        mag = mag + abs(layer.scaling) * we * ((xd.abs() @ a.abs().t()) @ b.abs().t())
    assert_close(y, want, c["dtype"], name="MoE", scale=float(mag.max()) if mag.numel() else None)
