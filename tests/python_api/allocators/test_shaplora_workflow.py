"""shaplora_workflow's guards (issue 16): budgets as totals checked before training, no silent failure of the
super-network, score stability; to_merged_basis and orthogonality_hooks; AdaLoRA's total budget."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from python_api.allocators.adalora import AdaLoRAAllocator, orthogonality_penalty
from python_api.layers import LoRALinear
from python_api.allocators.shaplora import (
    SupernetNotLearnedError,
    allocate_ranks,
    orthogonality_hooks,
    shaplora_allocate,
    shaplora_workflow,
    to_merged_basis,
)
from tests.helpers import adam_pass, assert_close


class Stack(nn.Module):
    def __init__(self, n=4, d=8, r=3, svd=True):
        super().__init__()
        self.layers = nn.ModuleList([LoRALinear(d, d, r, alpha=r, svd=svd) for _ in range(n)])

    def forward(self, x):
        for lin in self.layers:
            x = x + torch.tanh(lin(x))
        return x


def mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean(1)


def _adam_train(calls, data, steps=60, lr=2e-2):
    def train(net):
        calls.append(net)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
        x, y = data
        for i in range(steps):
            j = slice((i * 64) % 256, (i * 64) % 256 + 64)
            loss = mse(net, (x[j], y[j])).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return train


def _planted_builder(seed=0, n=4, d=8):
    """Teacher = frozen base + a rank-1 delta in module 1; the student starts at the frozen base."""
    torch.manual_seed(seed)
    base = Stack(n, d)
    teacher = Stack(n, d)
    teacher.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        teacher.layers[1].weight += 0.8 * torch.randn(d, 1, generator=g) @ torch.randn(1, d, generator=g) / 3
    teacher.requires_grad_(False)
    x = torch.randn(768, d, generator=g)
    with torch.no_grad():
        y = teacher(x)

    def build():
        torch.manual_seed(seed + 100)
        net = Stack(n, d)
        net.load_state_dict({k: v for k, v in base.state_dict().items() if ".lora" not in k}, strict=False)
        return net
    return build, [(x[:256], y[:256])], (x[256:], y[256:])


# ---- budgets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc", [
    ({"budget": 7.5}, TypeError), ({"budget": 7.0}, TypeError), ({"budget": True}, TypeError),
    ({"budget": "7"}, TypeError), ({"r_target": 14 / 12}, TypeError), ({"budget": 0}, ValueError),
    ({"budget": 13}, ValueError), ({"r_target": 4}, ValueError), ({}, ValueError),
    ({"budget": 3, "r_target": 1}, ValueError)])
def test_workflow_budget_checked_before_training(kwargs, exc):
    build, val, data = _planted_builder()
    calls = []
    with pytest.raises(exc, match="budget|r_target"):
        shaplora_workflow(build, _adam_train(calls, data), val, lambda m: None, loss_fn=mse, **kwargs)
    assert calls == []  # 4 modules × r 3 = 12 ranks: 13 and r_target 4 (16) are refused before any training


def test_workflow_total_budget_numpy_and_result_fields():
    build, val, data = _planted_builder()
    calls = []
    out = shaplora_workflow(build, _adam_train(calls, data), val, lambda m: float(mse(m, data).mean().detach()),
                            loss_fn=mse, budget=np.int64(1), seed=1)
    assert out["budget"] == 1 and sum(int(m.sum()) for m in out["masks"].values()) == 1
    assert out["peft_rank_pattern"] == {"layers.1": 1}  # the planted module
    assert -1.0 <= out["score_stability"] <= 1.0 and out["score_stability_rounds"] == [out["score_stability"]]
    sup = out["supernet"]
    assert sup["val_loss"] < 0.95 * sup["val_loss_untrained"] and sup["extra_train_calls"] == 0
    assert len(calls) == 2  # the super-network, then the retrain


@pytest.mark.parametrize("retrain", ["plain", "svd"])
def test_build_model_returning_the_supernet_again_is_refused(retrain):
    build, val, data = _planted_builder()
    net = build()
    calls = []
    with pytest.raises(ValueError, match="build_model must return a new model on each call"):
        shaplora_workflow(lambda: net, _adam_train(calls, data), val, lambda m: None, loss_fn=mse, budget=1,
                          retrain=retrain)
    assert len(calls) == 1   # the super-network trained; the retrain never started on it


def test_allocate_step_alone_matches_the_workflow():
    """shaplora_allocate on a super-network trained by hand (what the CLI and the demo run) keeps the ranks the
    workflow keeps from the same super-network and coalition draws, and masks them in the super-network."""
    build, val, data = _planted_builder()
    out = shaplora_workflow(build, _adam_train([], data), val, lambda m: None, loss_fn=mse, budget=2, seed=3,
                            rounds=2)
    sup = build()
    _adam_train([], data)(sup)
    gen = torch.Generator()
    gen.set_state(out["rng_state"])
    alloc = shaplora_allocate(sup, val, 2, loss_fn=mse, rounds=2, generator=gen)
    assert {n: m.tolist() for n, m in alloc["masks"].items()} == {n: m.tolist() for n, m in out["masks"].items()}
    assert alloc["score_stability_rounds"] == out["score_stability_rounds"] and alloc["budget"] == 2
    assert {n: m.rank_mask.bool().tolist() for n, m in zip(("layers.0", "layers.1", "layers.2", "layers.3"),
                                                             sup.layers)} == {n: m.tolist()
                                                                              for n, m in alloc["masks"].items()}


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"budget": 13}, ValueError, "budget"), ({"budget": 2.0}, TypeError, "budget"),
    ({"budget": 2, "rounds": 0}, ValueError, "rounds"), ({"budget": 2, "basis": "x"}, ValueError, "basis"),
    ({"budget": 2, "budget_unit": "flops"}, ValueError, "budget_unit"),
    ({"budget": 15, "budget_unit": "params"}, ValueError, "budget")])   # one rank costs 8 + 8: 15 keeps none
def test_allocate_step_bad_arguments_name_them(kwargs, exc, match):
    build, val, _ = _planted_builder()
    sup = build()
    before = {k: v.clone() for k, v in sup.state_dict().items()}
    with pytest.raises(exc, match=match):
        shaplora_allocate(sup, val, loss_fn=mse, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in sup.state_dict().items())   # nothing half-done
    with pytest.raises(TypeError, match="budget"):
        shaplora_allocate(sup, val, None, loss_fn=mse)
    with pytest.raises(ValueError, match="val_batches"):
        shaplora_allocate(sup, [], 2, loss_fn=mse)
    with pytest.raises(ValueError, match="no LoRALinear"):
        shaplora_allocate(nn.Linear(3, 3), val, 2, loss_fn=mse)


def test_allocate_step_failing_in_a_later_round_leaves_the_supernet_as_it_came():
    build, val, data = _planted_builder()
    sup = build()
    _adam_train([], data)(sup)
    before = {k: v.clone() for k, v in sup.state_dict().items()}
    calls = []

    def loss_fn(m, b):   # the second round's scoring fails: the first round's masks and basis must be undone
        calls.append(1)
        if len(calls) > 2 * len(val):
            raise RuntimeError("loss exploded")
        return mse(m, b)
    with pytest.raises(RuntimeError, match="loss exploded"):
        shaplora_allocate(sup, val, 2, loss_fn=loss_fn, rounds=2)
    assert len(calls) == 2 * len(val) + 1   # raised in round 2, after round 1 had masked the super-network
    assert all(torch.equal(before[k], v) for k, v in sup.state_dict().items())


def test_allocate_ranks_budget_types():
    scores = {"a": torch.tensor([0.5, -1.0, 2.0]), "b": torch.tensor([0.1, 3.0])}
    assert sum(int(m.sum()) for m in allocate_ranks(scores, np.int32(3)).values()) == 3
    for bad in (2.0, True, "2", None):
        with pytest.raises(TypeError, match="budget"):
            allocate_ranks(scores, bad)
    with pytest.raises(ValueError, match="budget"):
        allocate_ranks(scores, 6)


def test_adalora_total_budget():
    m = Stack(4, 8, 3)
    alloc = AdaLoRAAllocator(m, budget=np.int64(7), total_step=20, tinit=2, tfinal=4, deltaT=2)
    assert alloc.target_bgt == 7 and alloc.init_bgt == 12
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-2)
    g = torch.Generator().manual_seed(0)
    for step in range(20):
        x = torch.randn(16, 8, generator=g)
        nn.functional.mse_loss(m(x), torch.sin(3 * x)).backward()
        opt.step()
        alloc.update_and_allocate(step)
        opt.zero_grad()
    assert sum(map(sum, alloc.rank_pattern.values())) == 7
    for kwargs, exc in (({"budget": 7.0}, TypeError), ({"budget": 13}, ValueError), ({"budget": 0}, ValueError),
                        ({"target_r": 1.5}, TypeError), ({"target_r": 2, "budget": 7}, ValueError), ({}, ValueError)):
        with pytest.raises(exc, match="budget|target_r"):
            AdaLoRAAllocator(Stack(4, 8, 3), total_step=20, **kwargs)


# ---- no silent failure ------------------------------------------------------------------------------------------
def test_supernet_that_cannot_learn_raises_after_bounded_extension():
    build, val, data = _planted_builder()
    calls = []

    def frozen(net):  # a learning rate of 0: the super-network never moves
        calls.append(net)
        _adam_train([], data, lr=0.0)(net)
    with pytest.warns(RuntimeWarning, match="has not learned") as rec:
        with pytest.raises(SupernetNotLearnedError, match="did not learn after 3 train calls"):
            shaplora_workflow(build, frozen, val, lambda m: None, loss_fn=mse, budget=2, max_extra_train=2)
    assert len(calls) == 3 and all(c is calls[0] for c in calls)
    assert sum("has not learned" in str(w.message) for w in rec) == 2


def test_supernet_extended_once_then_scored():
    build, val, data = _planted_builder()
    calls = []
    inner = _adam_train([], data)

    def slow(net):  # the first call does nothing (too few steps), the next ones train
        calls.append(net)
        if len(calls) > 1:
            inner(net)
    with pytest.warns(RuntimeWarning, match=r"training it again \(1/2\)"):
        out = shaplora_workflow(build, slow, val, lambda m: None, loss_fn=mse, budget=1)
    assert out["supernet"]["extra_train_calls"] == 1 and len(calls) == 3  # 2 super-net calls + the retrain


def test_classification_must_beat_majority_class():
    # Labels carry no signal (80 % class 0): the super-network's loss falls by learning the prior, but its
    # validation accuracy cannot beat the majority class, so its scores would be noise.
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 8, generator=g) + 1.0  # a non-zero mean lets the adapter shift the logits (the prior)
    y = (torch.rand(1024, generator=g) < 0.2).long()

    class Clf(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = LoRALinear(8, 8, 3, alpha=3, svd=True)
            self.head = nn.Linear(8, 2).requires_grad_(False)
            with torch.no_grad():
                self.head.bias.copy_(torch.tensor([0.0, 1.0]))  # starts biased to the minority class

        def forward(self, v):
            return self.head(torch.tanh(self.fc(v)))

    def ce(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")

    def train(net):
        adam_pass(net, ce, x, y, n=512, batch=32, lr=2e-2)

    def predict(model, batch):
        return model(batch[0]).argmax(1), batch[1]
    val = [(x[512:], y[512:])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ok = shaplora_workflow(Clf, train, val, lambda m: None, loss_fn=ce, budget=2)  # the loss alone passes
        assert ok["supernet"]["val_loss"] < 0.95 * ok["supernet"]["val_loss_untrained"]
        with pytest.raises(SupernetNotLearnedError, match="majority class"):
            shaplora_workflow(Clf, train, val, lambda m: None, loss_fn=ce, budget=2, predict_fn=predict)


def test_unstable_scores_warn():
    build, val, data = _planted_builder()
    with pytest.warns(RuntimeWarning, match="unstable"):
        out = shaplora_workflow(build, _adam_train([], data), val, lambda m: None, loss_fn=mse, budget=1,
                                min_stability=1.01)
    assert out["score_stability"] < 1.01


# ---- the super-network's basis -------------------------------------------------------------------------------------
@pytest.mark.parametrize("svd", [True, False])
def test_to_merged_basis_keeps_outputs_and_orthogonalises(svd):
    torch.manual_seed(0)
    net = Stack(3, 10, 4, svd=svd)
    with torch.no_grad():
        for lin in net.layers:
            lin.lora_A.normal_()
            lin.lora_B.normal_()
            if svd:
                lin.lora_E.normal_()
            # near-parallel components, as a super-network trained without an orthogonality term has
            lin.lora_A[1] = lin.lora_A[0] + 1e-3 * lin.lora_A[1]
    net.layers[2].set_rank_mask([1, 1, 0, 1])
    masked_a = net.layers[2].lora_A[2].clone()
    x = torch.randn(32, 10)
    before = [lin.delta_weight().detach() for lin in net.layers]
    y0 = net(x).detach()
    sv = to_merged_basis(net)
    for lin, dw in zip(net.layers, before):
        assert_close(lin.delta_weight(), dw)
        act = lin.rank_mask.nonzero().flatten()
        a = lin.lora_A[act]
        assert_close(a @ a.T, torch.eye(act.numel()))
        if svd:
            b = lin.lora_B[:, act]
            assert_close(b.T @ b, torch.eye(act.numel()))
    assert_close(net(x), y0)
    assert torch.equal(net.layers[2].lora_A[2], masked_a)  # masked slots untouched
    assert sv["layers.0"][1] < 1e-2 * sv["layers.0"][0] or sv["layers.0"].numel() == 4
    shared = nn.Parameter(torch.randn(4, 10))
    with pytest.raises(ValueError, match="share"):
        to_merged_basis(nn.ModuleList([LoRALinear(10, 10, 4, lora_A=shared), LoRALinear(10, 10, 4, lora_A=shared)]))


def test_orthogonality_hooks_add_the_penalty_gradient():
    torch.manual_seed(0)
    net = Stack(3, 8, 3)
    with torch.no_grad():
        for lin in net.layers:
            lin.lora_E.normal_()
    x = torch.randn(16, 8)
    params = [p for p in net.parameters() if p.requires_grad]
    (net(x).pow(2).mean() + 0.3 * orthogonality_penalty(net)).backward()
    ref = [p.grad.clone() for p in params]
    net.zero_grad()
    with orthogonality_hooks(net, 0.3):
        net(x).pow(2).mean().backward()
    for p, r in zip(params, ref):
        assert_close(p.grad, r)
    net.zero_grad()
    net(x).pow(2).mean().backward()  # the hooks are gone after the block
    assert not all(torch.allclose(p.grad, r) for p, r in zip(params, ref))
    with pytest.raises(ValueError, match="weight"):
        with orthogonality_hooks(net, -1.0):
            pass
