"""Careful-misuse round 14: surgery, ShapLoRA's helpers, distributed and sensitivity edges. Each test failed on the
code before its fix (a wrong result or state with no error, or an error naming nothing)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import python_api as lk
from lora_kernels.sensitivity.op import fused_sensitivity_update, per_example_gate_grad
from python_api import distributed
from python_api.allocators import shaplora as sh


class _Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.q, self.v = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.v(torch.relu(self.q(x)))


class _Net(nn.Module):
    def __init__(self, n=2, d=8):
        super().__init__()
        self.layers = nn.ModuleList([_Block(d) for _ in range(n)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.head(x)


class _Attn(nn.Module):
    """An nn.MultiheadAttention (its out_proj is an nn.Linear whose forward never runs) beside a plain linear."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)


class _Holder(nn.Module):
    """One linear of the given class, ``fc`` [8 → 8]."""

    def __init__(self, linear_cls):
        super().__init__()
        self.fc = linear_cls(8, 8)

    def forward(self, x):
        return self.fc(x)


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _scored_net(r=2):
    torch.manual_seed(0)
    model = lk.apply_adapters(_Net(n=1), ["q", "v"], r=r, svd=True)
    with torch.no_grad():
        for layer in lk.adapter_layers(model).values():
            layer.lora_E.normal_()
            layer.lora_B.normal_()
    return model, [(torch.randn(8, 8), torch.randint(0, 3, (8,)))]


# ---- surgery ------------------------------------------------------------------------------------------------------
def test_to_plain_lora_adapts_exactly_the_kept_modules():
    """kept "fc" must not adapt "block.fc" (allocated rank 0) by the suffix rule of a name list."""
    class N(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.block = nn.Module()
            self.block.fc = nn.Linear(8, 8)

    model = lk.apply_adapters(N(), "fc|block\\.fc", r=4, svd=True)
    sh.to_plain_lora(model, {"fc": torch.tensor([1, 1, 0, 0], dtype=torch.bool), "block.fc": torch.zeros(4).bool()})
    assert {n: m.r for n, m in lk.adapter_layers(model).items()} == {"fc": 2}
    assert type(model.block.fc) is nn.Linear


def test_linear_subclasses_whose_forward_is_not_x_w_plus_b_are_refused():
    model = _Attn()   # its out_proj's forward never runs: left out with a warning (a suffix list such as SigLIP's
    with pytest.warns(RuntimeWarning, match=r"left out \['attn.out_proj'\].*MultiheadAttention"):   # must work)
        lk.apply_adapters(model, ["out_proj", "fc"], r=2)
    assert list(lk.adapter_layers(model)) == ["fc"]
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="matches no nn.Linear"):
        lk.apply_adapters(_Attn(), ["out_proj"], r=2)         # nothing else to adapt: an error

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match=r"'fc' is a Scaled, an nn.Linear subclass whose forward is not"):
        lk.apply_adapters(_Holder(Scaled), ["fc"], r=2)

    class Plain(nn.Linear):   # its own forward, computing x·Wᵀ + b (Falcon's FalconLinear): adapted, output kept
        def forward(self, x):
            y = x @ self.weight.T
            return y if self.bias is None else y + self.bias

    model, x = _Holder(Plain), torch.randn(3, 8)
    calls = []
    model.fc.register_forward_hook(lambda *a: calls.append(1))
    y = model(x)
    lk.apply_adapters(model, ["fc"], r=2)
    assert calls == [1]                                     # the probe ran the class's forward, not the hooks
    assert torch.allclose(model(x), y, atol=1e-6)
    with torch.no_grad():
        model.fc.lora_B.normal_()
    assert not torch.allclose(model(x), y, atol=1e-3)      # the adapter runs

    class Gated(nn.Linear):   # x·Wᵀ + b while its extra parameter is 1: the state is named, not probed
        def __init__(self, *a):
            super().__init__(*a)
            self.scale = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return super().forward(x) * self.scale

    with pytest.raises(TypeError, match=r"it holds \['scale'\] besides weight and bias"):
        lk.apply_adapters(_Holder(Gated), ["fc"], r=2)
    nan_model = _Holder(Plain)
    with torch.no_grad():
        nan_model.fc.weight[0, 0] = float("nan")            # a NaN weight is no reason to refuse
    lk.apply_adapters(nan_model, ["fc"], r=2)
    assert list(lk.adapter_layers(nan_model)) == ["fc"]
    with torch.autocast("cpu", dtype=torch.bfloat16):      # nor is autocast
        lk.apply_adapters(_Holder(Plain), ["fc"], r=2)

    class Tagged(nn.Linear):   # a subclass that keeps nn.Linear's forward is fine
        pass

    assert list(lk.adapter_layers(lk.apply_adapters(_Holder(Tagged), ["fc"], r=2))) == ["fc"]


def test_adapters_follow_the_models_train_eval_mode():
    model = _Net().eval()
    lk.apply_adapters(model, ["q", "v"], r=2, dropout=0.5)
    assert not any(m.training for m in lk.adapter_layers(model).values())
    x = torch.randn(4, 8)
    with torch.no_grad():
        for layer in lk.adapter_layers(model).values():
            layer.lora_B.normal_()
    assert torch.equal(model(x), model(x))                 # no dropout in eval mode
    lk.merge_adapters(model, reversible=True)              # merged in eval mode: eval-mode linears
    assert not model.layers[0].q.training
    model.train()
    lk.unmerge_adapters(model)                              # the adapters come back in the mode the model has now
    assert all(m.training for m in lk.adapter_layers(model).values())
    model.eval()
    assert torch.equal(model(x), model(x))
    masks = {n: torch.tensor([True, False]) for n in lk.adapter_layers(model)}
    svd = lk.apply_adapters(_Net(), ["q", "v"], r=2, svd=True, dropout=0.5).eval()
    sh.to_plain_lora(svd, masks)                           # the plain retrain form keeps the mode too
    assert not any(m.training for m in lk.adapter_layers(svd).values())


def test_modules_to_save_tied_to_an_adapted_weight_is_refused():
    class T(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.mid = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 10, bias=False)
            self.lm_head.weight = self.emb.weight

    model = T()
    with pytest.raises(ValueError, match=r"modules_to_save 'emb'.*'lm_head.weight'.*tied"):
        lk.apply_adapters(model, ["lm_head", "mid"], r=2, modules_to_save=["emb"])
    assert type(model.lm_head) is nn.Linear and not lk.adapter_layers(model)


# ---- Shapley scoring: merged layers refused up front, the user's gates and mode restored ---------------------------
def test_scoring_refuses_a_merged_layer_before_touching_the_model():
    model, val = _scored_net()
    model.train()
    gate = torch.ones(8, 2)
    model.layers[0].v.set_token_gate(gate)
    model.layers[0].q.merge()
    for mode in ("taylor", "exact"):
        with pytest.raises(ValueError, match=r"merged: \['layers.0.q'\]"):
            sh.shapley_sensitivity(model, val, mode, loss_fn=_loss)
        assert model.training and model.layers[0].v._token_gate is gate


def test_scoring_with_no_players_keeps_the_users_gate():
    model, val = _scored_net()
    gate = torch.ones(8, 2)
    model.layers[0].q.set_token_gate(gate)
    for layer in lk.adapter_layers(model).values():
        layer.set_rank_mask([0, 0])
    with pytest.raises(ValueError, match="no players"):
        sh.shapley_sensitivity(model, val, "exact", loss_fn=_loss)
    assert model.layers[0].q._token_gate is gate


def test_scoring_puts_back_a_token_gate_the_user_set():
    model, val = _scored_net(r=3)
    layer = model.layers[0].q
    gate = torch.ones(8, 3)
    layer.set_token_gate(gate)
    ref_model, _ = _scored_net(r=3)
    for mode in ("exact", "taylor"):
        got = sh.shapley_sensitivity(model, val, mode, loss_fn=_loss, q=1.0 if mode == "taylor" else None)
        want = sh.shapley_sensitivity(ref_model, val, mode, loss_fn=_loss, q=1.0 if mode == "taylor" else None)
        assert layer._token_gate is gate
        for n in want:   # the user's gate took no part in the scoring
            assert torch.allclose(got[n], want[n], atol=1e-9), (mode, n)


# ---- ShapLoRA's helpers: budgets, scores and masks checked -----------------------------------------------------------
def test_select_within_budget_never_keeps_nan_and_checks_the_budget():
    key = torch.tensor([0.1, float("nan"), 0.5, 0.3])
    assert sh.select_within_budget(key, 2).tolist() == [False, False, True, True]
    assert sh.select_within_budget(key, 3, costs=torch.ones(4, dtype=torch.long)).tolist() == [True, False, True,
                                                                                                  True]
    # a -inf key (a rank pruned earlier) stays out even when its cost is what still fits
    assert sh.select_within_budget(torch.tensor([1.0, 0.5, -math.inf]), 9, costs=torch.tensor([10, 1, 1])).tolist() \
        == [False, True, False]
    with pytest.raises(ValueError, match="budget must be in"):
        sh.select_within_budget(torch.tensor([0.1, 0.2]), -1)
    with pytest.raises(TypeError, match="budget must be an integer"):
        sh.select_within_budget(torch.tensor([0.1, 0.2]), 2.5)


def test_allocate_ranks_refuses_non_dict_and_2d_scores():
    with pytest.raises(ValueError, match=r"1-D \[R\] per module.*'a': \(2, 3\)"):
        sh.allocate_ranks({"a": torch.rand(2, 3)}, 2)
    with pytest.raises(TypeError, match="scores must be a dict"):
        sh.allocate_ranks([torch.rand(3)], 2)


def test_mask_exports_agree_and_refuse_non_binary_masks():
    with pytest.raises(ValueError, match=r"masks\['x'\]: must be boolean or 0/1"):
        sh.rank_pattern_config({"x": torch.tensor([2, 0])})
    with pytest.raises(ValueError, match=r"masks\['x'\]: must be boolean or 0/1"):
        sh.to_peft_rank_pattern({"x": [0.5, 1.0]})
    masks = {"x": [1, 0, 1]}   # a plain list is a mask too
    assert sh.to_peft_rank_pattern(masks) == {"x": 2}
    assert sh.masks_from_config(sh.rank_pattern_config(masks))["x"].tolist() == [True, False, True]


@pytest.mark.parametrize("bad, match", [([], "must be a dict"), ("[]", "must be a dict"), ("{", "not JSON"),
                                        ({"format": "lora_kernels.rank_pattern"}, "'modules' must be a dict"),
                                        ({"format": "lora_kernels.rank_pattern", "modules": [1]},
                                         "'modules' must be a dict"),
                                        ({"format": "lora_kernels.rank_pattern", "modules": {"q": [0, 1]}},
                                         "module 'q': expected")])
def test_masks_from_config_names_what_is_malformed(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        sh.masks_from_config(bad)


# ---- distributed, sensitivity --------------------------------------------------------------------------------
def test_distributed_helpers_check_their_arguments():
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        distributed.same_on_all_ranks(1, group="x")
    model, val = _scored_net()
    with pytest.raises(ValueError, match="no return_stats"):
        distributed.distributed_shapley_sensitivity(model, val, loss_fn=_loss, return_stats=True)


def test_empty_shard_keeps_the_users_token_gates():
    model, _ = _scored_net()
    gate = torch.ones(4, 2)
    model.layers[0].q.set_token_gate(gate)
    with pytest.raises(ValueError, match="every rank's validation shard is empty"):
        distributed.distributed_shapley_sensitivity(model, [], loss_fn=_loss)
    assert model.layers[0].q._token_gate is gate


def test_per_example_gate_grad_takes_numpy_ints():
    dg = torch.randn(6, 4)
    assert torch.equal(per_example_gate_grad(dg, np.int64(3)), per_example_gate_grad(dg, 3))
    with pytest.raises(TypeError, match="batch must be an int"):
        per_example_gate_grad(dg, 3.0)


def test_sensitivity_update_refuses_empty_tensors_on_every_backend():
    a = torch.zeros(2, 0)
    with pytest.raises(ValueError, match=r"params\[0\] \(kind 1\) has no elements"):
        fused_sensitivity_update([a], [a.clone()], [a.clone()], [a.clone()], [1], [0], torch.zeros(2))


def test_falcon_linears_take_adapters():
    """FalconLinear is an nn.Linear subclass with its own forward computing x·Wᵀ + b: adapted like nn.Linear."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, vocab_size=50)
    model = transformers.FalconForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (1, 6))
    before = model(ids).logits
    lk.apply_adapters(model, ["query_key_value", "dense"], r=2)
    assert len(lk.adapter_layers(model)) == 4
    assert torch.allclose(model(ids).logits, before, atol=1e-5)
    with torch.no_grad():
        for layer in lk.adapter_layers(model).values():
            layer.lora_B.normal_()
    assert not torch.allclose(model(ids).logits, before, atol=1e-3)   # the adapters run


def test_default_app_targets_leave_out_what_cannot_take_an_adapter():
    from python_api.app.byo_model import block_linears

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([_Attn(), _Attn()])

    with pytest.warns(RuntimeWarning, match=r"left out of the targets \['layers.0.attn.out_proj'"):
        assert block_linears(Net()) == ["layers.0.fc", "layers.1.fc"]
