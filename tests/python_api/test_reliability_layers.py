"""No silent failure in the op, the layers, surgery and MoE (issue #14, classes 2, 3, 4, 6 and the unclear errors).

Tied weights: merging a layer whose weight is tied to another module leaves that module alone, the merged output
equals the adapter output, and unmerging is bit-exact. Non-finite hyper-parameters, contradictory arguments and
malformed inputs: a clear error of the documented type naming the argument. Surgery that fails late leaves the
model exactly as it was, and a corrected retry works.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import python_api as lk
from lora_kernels.gated_lora import lora_linear
from lora_kernels.gated_lora.reference import lora_linear_ref
from python_api.moe import MoELoRALinear
from python_api.surgery import adapter_layers
from tests.helpers import assert_close, randn
from tests.python_api.toy_models import randomize_b, toy

NAN, INF = float("nan"), float("inf")


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# ---- tied weights (class 2) --------------------------------------------------------------------------------------
class TiedLM(nn.Module):
    """GPT-2's tie: ``lm_head.weight is wte.weight``; plus a Linear ``twin`` whose weight is ``body.weight``."""

    def __init__(self, vocab: int = 11, d: int = 8, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(vocab, d, dtype=dtype)
        self.body = nn.Linear(d, d, dtype=dtype)
        self.twin = nn.Linear(d, d, dtype=dtype)
        self.twin.weight = self.body.weight
        self.lm_head = nn.Linear(d, vocab, bias=False, dtype=dtype)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        h = self.wte(ids)
        return self.lm_head(self.body(h) + self.twin(h))


def _tied(dtype, targets):
    m = lk.apply_adapters(TiedLM(dtype=dtype), targets, r=2, alpha=4)
    randomize_b(m)
    return m


IDS = torch.tensor([[1, 4, 7, 10], [0, 2, 3, 9]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("how", ["merge_adapters", "merge_adapters_reversible", "layer_merge"])
@pytest.mark.parametrize("targets", [["lm_head"], ["twin"], ["body", "twin", "lm_head"]])
def test_merge_of_tied_weight_leaves_other_module_alone(dtype, how, targets):
    m = _tied(dtype, targets)
    emb_before = m.wte.weight.detach().clone()
    body_before = m.body.weight.detach().clone()
    with torch.no_grad():
        y_adapter = m(IDS)
        emb_out = m.wte(IDS)
        body_out = (m.body if "body" not in targets else m.body).weight @ torch.ones(8, dtype=dtype)
    if how.startswith("merge_adapters"):
        lk.merge_adapters(m, reversible=how.endswith("reversible"))
    else:
        for layer in adapter_layers(m).values():
            layer.merge()
    with torch.no_grad():
        y_merged = m(IDS)
        # the other module: its weight and its output are unchanged
        assert torch.equal(m.wte.weight, emb_before), "wte changed by merging lm_head"
        assert torch.equal(m.wte(IDS), emb_out)
        if "body" not in targets:
            assert torch.equal(m.body.weight, body_before), "body changed by merging twin"
            assert torch.equal(m.body.weight @ torch.ones(8, dtype=dtype), body_out)
    # the merged model computes what the adapters computed (per-dtype tolerance vs the fp64 adapter output)
    assert_close(y_merged, y_adapter.double(), dtype, name=f"merged vs adapter ({how})")
    if how == "merge_adapters":
        return
    if how == "merge_adapters_reversible":
        lk.unmerge_adapters(m)
    else:
        for layer in adapter_layers(m).values():
            layer.unmerge()
    with torch.no_grad():
        assert torch.equal(m(IDS), y_adapter), "unmerge is not bit-exact"
    assert torch.equal(m.wte.weight, emb_before)
    if "lm_head" in targets:
        assert m.lm_head.weight is m.wte.weight, "unmerge did not restore the tie"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_merge_precision_matches_adapter_output(dtype):
    # The merged weight W + ΔW is formed in at least fp32 and in fp64 for an fp64 layer (an fp64 model merged
    # through fp32 would be off by ~1e-8 relative, far beyond fp64's tolerance).
    torch.manual_seed(3)
    layer = lk.LoRALinear(16, 12, 4, alpha=8.0, dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = randn(5, 16, dtype=dtype)
    with torch.no_grad():
        want = lora_linear_ref(x.double(), layer.weight.double(), layer.bias.double(), layer.lora_A.double(),
                               layer.lora_B.double(), layer.scaling)
        layer.merge()
        assert_close(layer(x), want, dtype, name="merged layer")
        layer.unmerge()
        lin = lk.merge_adapters(nn.Sequential(layer))[0]
        assert_close(lin(x), want, dtype, name="merge_adapters")


# ---- non-finite hyper-parameters (class 3) -----------------------------------------------------------------------
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_hyper_parameters_are_refused(bad):
    x, w, a, b = randn(3, 4), randn(5, 4), randn(2, 4), randn(5, 2)
    cases = [
        ("scale", lambda: lora_linear(x, w, None, a, b, bad)),
        ("dropout_p", lambda: lora_linear(x, w, None, a, b, 1.0, dropout_p=bad)),
        ("alpha", lambda: lk.LoRALinear(4, 4, 2, alpha=bad)),
        ("dropout", lambda: lk.LoRALinear(4, 4, 2, dropout=bad)),
        ("alpha", lambda: lk.apply_adapters(toy(), ["q_proj"], r=2, alpha=bad)),
        ("dropout", lambda: lk.apply_adapters(toy(), ["q_proj"], r=2, dropout=bad)),
        ("alpha", lambda: MoELoRALinear(4, 4, 2, 2, alpha=bad)),
        ("dropout", lambda: MoELoRALinear(4, 4, 2, 2, dropout=bad)),
        ("load_balance_coef", lambda: MoELoRALinear(4, 4, 2, 2, load_balance_coef=bad)),
        ("alpha", lambda: lk.apply_moe_adapters(toy(), ["q_proj"], [2, 2, 2], r=2, alpha=bad)),
        ("load_balance_coef", lambda: lk.apply_moe_adapters(toy(), ["q_proj"], [2, 2, 2], r=2, alpha=1.0,
                                                            load_balance_coef=bad)),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=name):
            call()


# ---- contradictory arguments (class 4) ---------------------------------------------------------------------------
def test_active_must_agree_with_gate():
    x, w, a, b = randn(3, 4), randn(5, 4), randn(2, 4), randn(5, 2)
    g = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match="active .* contradicts the gate"):
        lora_linear(x, w, None, a, b, 1.0, g, active=torch.tensor([1]))
    for bad in ([5], [-1], [0, 2]):
        with pytest.raises(ValueError, match=r"active holds rank indices outside \[0, R=2\)"):
            lora_linear(x, w, None, a, b, 1.0, g, active=torch.tensor(bad))
    with pytest.raises(ValueError, match="active .*needs a fixed per-rank gate"):
        lora_linear(x, w, None, a, b, 1.0, None, active=torch.tensor([0]))
    with pytest.raises(ValueError, match="active .*needs a fixed per-rank gate"):
        lora_linear(x, w, None, a, b, 1.0, torch.ones(3, 2), active=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="active must be a 1-D int64 tensor"):
        lora_linear(x, w, None, a, b, 1.0, g, active=torch.tensor([0], dtype=torch.int32))
    with pytest.raises(TypeError, match="active must be an int64 tensor"):
        lora_linear(x, w, None, a, b, 1.0, g, active=[0])
    # the agreeing list is accepted and gives the gate's result
    want = lora_linear_ref(x.double(), w.double(), None, a.double(), b.double(), 1.0, g.double())
    assert_close(lora_linear(x, w, None, a, b, 1.0, g, active=torch.tensor([0])), want, torch.float32)


def test_merge_with_token_gate_is_refused():
    m = lk.apply_adapters(toy(), ["q_proj"], r=2)
    layer = m.layers[0].q_proj
    layer.set_token_gate(torch.ones(6, 2))
    with pytest.raises(ValueError, match="per-token gate"):
        layer.merge()
    assert not layer.merged
    with pytest.raises(ValueError, match="per-token gate"):
        lk.merge_adapters(m)
    assert isinstance(m.layers[0].q_proj, lk.LoRALinear)   # nothing merged
    layer.set_token_gate(None)
    lk.merge_adapters(m)


# ---- half-applied models (class 6) -------------------------------------------------------------------------------
def _snapshot(m: nn.Module):
    return ([(n, type(x)) for n, x in m.named_modules()], {k: v.clone() for k, v in m.state_dict().items()},
            [(n, p.requires_grad) for n, p in m.named_parameters()])


def _assert_unchanged(m: nn.Module, before) -> None:
    types, state, flags = _snapshot(m)
    assert types == before[0], "module types changed"
    assert state.keys() == before[1].keys(), "state_dict keys changed"
    for k, v in state.items():
        assert torch.equal(v, before[1][k]), f"{k} changed"
    assert flags == before[2], "requires_grad flags changed"


APPLY_FAULTS = [
    ("rank_pattern", TypeError, {"rank_pattern": {"layers.2.q_proj": "x"}}),
    ("rank_pattern", ValueError, {"rank_pattern": {"layers.2.q_proj": 0}}),
    ("r=100 exceeds", ValueError, {"rank_pattern": {"layers.2.q_proj": 100}}),
    ("modules_to_save", ValueError, {"modules_to_save": ["nope"]}),
    ("modules_to_save", TypeError, {"modules_to_save": "classifier"}),
    ("mask length", ValueError, {"rank_masks": {"layers.2.q_proj": [1, 0]}}),
    ("0/1", ValueError, {"rank_masks": {"layers.2.v_proj": [2, 0, 1, 1]}}),
    ("cannot share", ValueError, {"share": "A", "rank_pattern": {"layers.2.q_proj": 2}}),
]


@pytest.mark.parametrize("match,err,kw", APPLY_FAULTS, ids=[f[0] + "-" + f[1].__name__ for f in APPLY_FAULTS])
def test_apply_adapters_failing_late_leaves_model_unchanged(match, err, kw):
    m = toy()
    m.classifier.weight.requires_grad_(False)   # a non-default flag that must survive the rollback
    before = _snapshot(m)
    with pytest.raises(err, match=match):
        lk.apply_adapters(m, ["q_proj", "v_proj"], r=4, **kw)
    _assert_unchanged(m, before)
    lk.apply_adapters(m, ["q_proj", "v_proj"], r=4, modules_to_save=["classifier"])
    assert len(adapter_layers(m)) == 6 and m.classifier.weight.requires_grad


MOE_FAULTS = [
    ("experts_per_layer", ValueError, ([2, 0],), {}),
    ("experts_per_layer has no entry for block 1", ValueError, ({0: 2},), {}),
    ("experts_per_layer for block 2", ValueError, ([2, 2, -1],), {}),
    ("modules_to_save", ValueError, ([2, 2, 2],), {"modules_to_save": ["nope"]}),
    ("modules_to_save", TypeError, ([2, 2, 2],), {"modules_to_save": "classifier"}),
    ("'layers.2.q_proj': top_k", ValueError, ([2, 2, 2],), {"top_k": [1, 1, 5]}),
    ("top_k must be an int", TypeError, ([2, 2, 2],), {"top_k": [1, 1, "x"]}),
]


@pytest.mark.parametrize("match,err,args,kw", MOE_FAULTS,
                         ids=[f"{i}-{f[1].__name__}" for i, f in enumerate(MOE_FAULTS)])
def test_apply_moe_adapters_failing_late_leaves_model_unchanged(match, err, args, kw):
    m = toy()
    before = _snapshot(m)
    with pytest.raises(err, match=match):
        lk.apply_moe_adapters(m, ["q_proj"], *args, r=2, alpha=4.0, **kw)
    _assert_unchanged(m, before)
    out = lk.apply_moe_adapters(m, ["q_proj"], [2, 2, 2], r=2, alpha=4.0, modules_to_save=["classifier"])
    assert len(out) == 3 and m.classifier.weight.requires_grad


# ---- unclear errors (class "unclear") ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [None, np.zeros((3, 4), dtype=np.float32), [[0.0] * 4]])
def test_non_tensor_input_is_a_type_error_naming_x(bad):
    w, a, b = randn(5, 4), randn(2, 4), randn(5, 2)
    shared = lk.apply_adapters(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), ["0", "1"], r=2, share="A")
    for call in (lambda: lora_linear(bad, w, None, a, b, 1.0), lambda: lk.LoRALinear(4, 5, 2)(bad),
                 lambda: MoELoRALinear(4, 5, 2, 2)(bad), lambda: shared(bad)):
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            call()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lora_linear(bad, w, None, a, b, 1.0)


def test_dropout_seed_out_of_range():
    x, w, a, b = randn(3, 4), randn(5, 4), randn(2, 4), randn(5, 2)
    for seed, err in ((2**70, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(err, match="seed must be an int in"):
            lora_linear(x, w, None, a, b, 1.0, dropout_p=0.1, seed=seed)


@pytest.mark.parametrize("lead", [(2,), (2, 3), (0,)])
def test_zero_size_k_gives_bias_like_nn_linear(lead):
    # nn.Linear(0, N) computes y = bias; the op does the same, and every gradient exists with its shape.
    x = torch.randn(*lead, 0, requires_grad=True)
    a = torch.randn(2, 0, requires_grad=True)
    b = torch.randn(3, 2, requires_grad=True)
    bias = torch.randn(3)
    y = lora_linear(x, torch.randn(3, 0), bias, a, b, 2.0, dropout_p=0.5)
    assert torch.equal(y, bias.expand(*lead, 3))
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape, "x cut out of the graph"
    assert a.grad.shape == a.shape
    assert torch.equal(b.grad, torch.zeros_like(b))
    with pytest.raises(ValueError, match=r"r=1 exceeds min\(in_features, out_features\)=0"):
        lk.LoRALinear(0, 3, 1)


def test_layer_constructor_arguments():
    for kw, err, name in (({"r": True}, TypeError, "r must be an int"), ({"r": 2.0}, TypeError, "r must be an int"),
                          ({"r": 0}, ValueError, "r must be >= 1"), ({"alpha": "x"}, TypeError, "alpha"),
                          ({"dropout": "x"}, TypeError, "dropout"), ({"dropout": 1.0}, ValueError, "dropout"),
                          ({"adapter_dtype": 3}, TypeError, "adapter_dtype"),
                          ({"adapter_dtype": torch.int64}, TypeError, "adapter_dtype"),
                          ({"adapter_dtype": "int8"}, ValueError, "adapter_dtype")):
        args = {"in_features": 4, "out_features": 4, "r": 2, **kw}
        with pytest.raises(err, match=name):
            lk.LoRALinear(**args)
    assert lk.LoRALinear(4, 4, np.int64(2), adapter_dtype="float64").lora_A.dtype == torch.float64
    for kw, err, name in (({"num_experts": 0}, ValueError, "num_experts"), ({"top_k": 3}, ValueError, "top_k"),
                          ({"top_k": 1.0}, TypeError, "top_k"), ({"adapter_dtype": 3}, TypeError, "adapter_dtype")):
        with pytest.raises(err, match=name):
            MoELoRALinear(**{"in_features": 4, "out_features": 4, "num_experts": 2, "r": 2, **kw})
    with pytest.raises(ValueError, match=r"x must be \[..., in_features=4\]"):
        MoELoRALinear(4, 4, 2, 2)(torch.randn(3, 5))


def test_surgery_argument_errors():
    for kw, err, name in (({"target_modules": None}, TypeError, "target_modules"),
                          ({"target_modules": "q_proj["}, ValueError, "not a valid regular expression"),
                          ({"target_modules": ["q_proj"], "adapter_dtype": 3}, TypeError, "adapter_dtype"),
                          ({"target_modules": ["q_proj"], "adapter_dtype": torch.int32}, TypeError, "adapter_dtype")):
        with pytest.raises(err, match=name):
            lk.apply_adapters(toy(), **kw, r=2)
    for target, err, name in ((None, TypeError, "target_modules"), ("q_proj[", ValueError, "regular expression"),
                              ([3], TypeError, "target_modules entries")):
        with pytest.raises(err, match=name):
            lk.apply_moe_adapters(toy(), target, [2, 2, 2], r=2, alpha=1.0)


def test_accumulation_buffer_checked_at_the_call_not_at_backward():
    x, w, a, b = randn(3, 4), randn(5, 4), randn(2, 4).requires_grad_(), randn(5, 2).requires_grad_()
    for kw, err, text in (({"accum_a": torch.zeros(4, 2)}, ValueError, r"accum_a must have the shape"),
                          ({"accum_b": torch.zeros(5, 4)[:, ::2]}, ValueError, "accum_b must be contiguous"),
                          ({"accum_a": torch.zeros(2, 4, dtype=torch.bfloat16)}, TypeError, "accum_a must be an fp32"),
                          ({"accum_b": [[0.0] * 2] * 5}, TypeError, "accum_b must be a torch.Tensor")):
        with pytest.raises(err, match=text):
            lora_linear(x, w, None, a, b, 1.0, **kw)


def test_shared_grad_replaced_by_unusable_tensor_is_a_clear_error():
    # The slot binds the shared matrix's .grad at backward: a .grad the user replaced by a non-contiguous tensor
    # cannot take the in-place accumulation, and the error says so.
    m = lk.apply_adapters(toy(), ["q_proj"], r=2, share="A")
    randomize_b(m)
    loss = m(randn(2, 3, 16)).sum()
    a = m.layers[0].q_proj.lora_A
    a.grad = torch.zeros(a.shape[1], a.shape[0]).t()
    with pytest.raises(RuntimeError, match="cannot be accumulated into in place"):
        loss.backward()


@pytest.mark.parametrize("reversible", [False, True])
def test_merge_with_nonfinite_delta_is_refused_before_any_layer_changes(reversible):
    m = lk.apply_adapters(toy(), ["q_proj", "v_proj"], r=2)
    randomize_b(m)
    names = list(adapter_layers(m))
    with torch.no_grad():   # only the last layer diverged: a merge that went layer by layer would write the others
        adapter_layers(m)[names[-1]].lora_B[0, 0] = INF   # (NaN != NaN would defeat the snapshot compare)
    before = _snapshot(m)
    with pytest.raises(ValueError, match=r"NaN/Inf.*nothing was merged"):
        lk.merge_adapters(m, reversible=reversible)
    _assert_unchanged(m, before)
    layer = adapter_layers(m)[names[-1]]
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.merge()
    assert not layer.merged
    with torch.no_grad():   # repaired, the same call merges
        layer.lora_B[0, 0] = 0.0
    lk.merge_adapters(m, reversible=reversible)
    assert not adapter_layers(m)


# ---- apply calls that would leave a model that trains wrongly -----------------------------------------------------
@pytest.mark.parametrize("second", ["lora", "moe"])
def test_second_apply_call_is_refused_and_first_adapters_stay_trainable(second):
    m = lk.apply_adapters(toy(), ["q_proj"], r=4)
    before = _snapshot(m)
    with pytest.raises(ValueError, match="already has 3 adapter layer"):
        if second == "lora":
            lk.apply_adapters(m, ["v_proj"], r=4)
        else:
            lk.apply_moe_adapters(m, ["v_proj"], [2, 2, 2], r=2, alpha=4)
    _assert_unchanged(m, before)
    assert m.layers[0].q_proj.lora_A.requires_grad


@pytest.mark.parametrize("save", [["q_proj"], ["layers.0"]])
def test_modules_to_save_that_holds_a_target_is_refused(save):
    m = toy()
    before = _snapshot(m)
    with pytest.raises(ValueError, match="modules_to_save .* adapter targets"):
        lk.apply_adapters(m, ["q_proj"], r=4, modules_to_save=save)
    with pytest.raises(ValueError, match="modules_to_save .* adapter targets"):
        lk.apply_moe_adapters(m, ["q_proj"], [2, 2, 2], r=2, alpha=4, modules_to_save=save)
    _assert_unchanged(m, before)


@pytest.mark.parametrize("kw,err,match", [
    ({"experts_per_layer": [0, 0, 0]}, ValueError, "0 experts to every targeted block"),
    ({"experts_per_layer": [2, 2, 2, 2]}, ValueError, r"experts \{3: 2\} to blocks no target reaches"),
    ({"experts_per_layer": [2, 2, 2], "top_k": 1.5}, TypeError, r"top_k must be an int .*block 0"),
])
def test_moe_arguments_that_would_train_nothing_or_be_cut_short(kw, err, match):
    m = toy()
    before = _snapshot(m)
    with pytest.raises(err, match=match):
        lk.apply_moe_adapters(m, ["q_proj"], r=2, alpha=4, **kw)
    _assert_unchanged(m, before)


@pytest.mark.parametrize("mask", [[0.5, 1, 1, 0.9], [NAN, 1, 1, 0], [2, 1, 0, 0]])
def test_config_rank_masks_must_be_zero_or_one(mask):
    with pytest.raises(ValueError, match=r"rank_masks\['q_proj'\] must hold only 0/1"):
        lk.AdapterConfig(target_modules=["q_proj"], r=4, rank_masks={"q_proj": mask})
    assert lk.AdapterConfig(target_modules=["q_proj"], r=4, rank_masks={"q_proj": [1.0, 0.0, True, 0]}).rank_masks == {
        "q_proj": [1, 0, 1, 0]}


@pytest.mark.parametrize("experts", [np.array([2, 1, 2]), torch.tensor([2, 1, 2]), range(2, 5), (2, 1, 2),
                                     [2, 1, 2, 0, 0]])
def test_moe_experts_per_layer_any_sequence(experts):
    m = toy()
    out = lk.apply_moe_adapters(m, ["q_proj"], experts, r=2, alpha=4, top_k=np.array([1, 1, 1]))
    want = list(experts)[:3]
    assert [out[f"layers.{i}.q_proj"].num_experts for i in range(3)] == [int(e) for e in want]
