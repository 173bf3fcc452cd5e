"""Parameter budgets and the plain-LoRA retrain of ShapLoRA (issue 16): allocate_ranks(costs=...),
shaplora_workflow(budget_unit="params", retrain="plain"|"svd"), to_plain_lora, AdapterConfig.alpha_pattern."""
import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from python_api.allocators.shaplora import (
    allocate_ranks,
    rank_costs,
    select_within_budget,
    shaplora_workflow,
    to_plain_lora,
)
from python_api.checkpoint import load_adapters, save_adapters
from python_api.layers import LoRALinear
from python_api.surgery import CONFIG_ATTR, adapter_layers, apply_adapters, count_trainable
from tests.python_api.allocators.test_shaplora_workflow import _adam_train, _planted_builder, mse


# ---- select_within_budget / allocate_ranks(costs=...) -------------------------------------------------------
@st.composite
def _items(draw):
    n = draw(st.integers(1, 12))
    key = draw(st.lists(st.one_of(st.floats(-5, 5, allow_nan=False), st.just(float("-inf"))), min_size=n,
                        max_size=n))
    costs = draw(st.lists(st.integers(1, 9), min_size=n, max_size=n))
    total = sum(c for c, k in zip(costs, key) if k != float("-inf"))
    budget = draw(st.integers(0, max(total, 0)))
    return torch.tensor(key, dtype=torch.float64), torch.tensor(costs), budget


@given(_items())
def test_select_within_budget_properties(case):
    key, costs, budget = case
    keep = select_within_budget(key, budget, costs)
    spent = int(costs[keep].sum())
    assert spent <= budget
    assert not bool(keep[key == float("-inf")].any())          # never a non-candidate
    left_out = (~keep) & (key != float("-inf"))
    # greedy fill: whatever was left out does not fit in what is left of the budget
    assert bool((costs[left_out] > budget - spent).all())
    # equal costs: exactly the rank budget's choice (the top budget // c)
    flat = select_within_budget(key, budget // 3, None)
    assert torch.equal(select_within_budget(key, budget // 3 * 3, torch.full_like(costs, 3)), flat)


def test_select_within_budget_skips_what_does_not_fit_and_takes_cheaper_later():
    key = torch.tensor([3.0, 2.0, 1.0])
    assert select_within_budget(key, 5, torch.tensor([4, 2, 1])).tolist() == [True, False, True]
    assert select_within_budget(key, 6, torch.tensor([4, 2, 1])).tolist() == [True, True, False]


def test_allocate_ranks_parameter_budget_and_errors():
    scores = {"a": torch.tensor([0.5, -1.0, 2.0]), "b": torch.tensor([0.1, 3.0, float("nan")])}
    costs = {"a": 10, "b": 25}
    masks = allocate_ranks(scores, 40, costs=costs)   # b1 (25) then a2 (10); a0 (10) would exceed 40
    assert masks["a"].tolist() == [False, False, True] and masks["b"].tolist() == [False, True, False]
    assert allocate_ranks(scores, 0, costs=costs)["a"].sum() == 0
    with pytest.raises(ValueError, match="budget"):
        allocate_ranks(scores, 3 * 10 + 2 * 25 + 1, costs=costs)   # more than every scored rank costs
    with pytest.raises(KeyError, match="'b'"):
        allocate_ranks(scores, 10, costs={"a": 10})
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="costs"):
            allocate_ranks(scores, 10, costs={"a": bad, "b": 5})


def test_rank_costs_per_form():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = LoRALinear(6, 10, 3, svd=True), LoRALinear(10, 6, 2, svd=True)
    m = Two()
    assert rank_costs(m) == {"up": 16, "down": 16}
    assert rank_costs(m, "svd") == {"up": 17, "down": 17}
    with pytest.raises(ValueError, match="form"):
        rank_costs(m, "dense")


# ---- to_plain_lora ------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v, self.ff = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.relu(self.ff(self.q(x) + self.v(x))))


def _svd_net(seed=0):
    torch.manual_seed(seed)
    base = Net()
    return base, apply_adapters(copy.deepcopy(base), ["q", "v", "ff"], r=4, alpha=8, svd=True, dropout=0.1,
                                modules_to_save=["head"])


def test_to_plain_lora_builds_the_rank_pattern_at_the_same_scale():
    base, net = _svd_net()
    weights = {n: m.weight for n, m in adapter_layers(net).items()}
    masks = {"q": torch.tensor([1, 0, 1, 1]).bool(), "v": torch.zeros(4, dtype=torch.bool),
             "ff": torch.tensor([0, 1, 0, 0]).bool()}
    to_plain_lora(net, masks)
    layers = adapter_layers(net)
    assert sorted(layers) == ["ff", "q"] and type(net.v) is nn.Linear
    assert net.v.weight is weights["v"] and not net.v.weight.requires_grad
    for n, k in (("q", 3), ("ff", 1)):
        lay = layers[n]
        assert not lay.svd and lay.r == k and lay.scaling == pytest.approx(2.0) and lay.dropout == 0.1
        assert lay.weight is weights[n]                                     # the frozen base, not a copy
        assert torch.count_nonzero(lay.lora_B) == 0 and lay.lora_A.requires_grad
    assert all(p.requires_grad for p in net.head.parameters())
    assert count_trainable(net, adapters_only=True) == 3 * 16 + 1 * 20
    net.eval()
    base.eval()
    x = torch.randn(5, 8)
    torch.testing.assert_close(net(x), base(x))                              # B = 0: the base model's output
    rec = getattr(net, CONFIG_ATTR)
    assert rec["rank_pattern"] == {"q": 3, "ff": 1} and rec["alpha_pattern"] == {"q": 6.0, "ff": 2.0}
    assert rec["svd"] is False and rec["modules_to_save"] == ["head"]


def test_to_plain_lora_checkpoint_round_trip(tmp_path):
    _, net = _svd_net()
    to_plain_lora(net, {"q": torch.tensor([1, 1, 0, 0]).bool(), "v": torch.tensor([0, 0, 0, 1]).bool(),
                        "ff": torch.ones(4, dtype=torch.bool)})
    with torch.no_grad():
        for lay in adapter_layers(net).values():
            lay.lora_B.normal_()
    save_adapters(net, tmp_path / "ck")
    fresh = Net()
    fresh.load_state_dict({k: v for k, v in _svd_net()[0].state_dict().items()})
    load_adapters(fresh, tmp_path / "ck")
    net.eval()
    fresh.eval()
    x = torch.randn(4, 8)
    torch.testing.assert_close(fresh(x), net(x))
    assert {n: (m.r, m.scaling) for n, m in adapter_layers(fresh).items()} == \
        {n: (m.r, m.scaling) for n, m in adapter_layers(net).items()}


def test_to_plain_lora_refuses_and_leaves_the_model_as_it_was():
    _, net = _svd_net()
    before = {n: m for n, m in adapter_layers(net).items()}
    with pytest.raises(ValueError, match="rank 0"):
        to_plain_lora(net, {n: torch.zeros(4, dtype=torch.bool) for n in before})
    with pytest.raises(KeyError, match="head"):
        to_plain_lora(net, {"head": torch.ones(3, dtype=torch.bool)})
    net.q.merge()
    with pytest.raises(ValueError, match="merged"):
        to_plain_lora(net, {n: torch.ones(4, dtype=torch.bool) for n in before})
    with pytest.raises(ValueError, match="a mask for every adapter layer"):
        to_plain_lora(net, {"q": torch.ones(4, dtype=torch.bool)})
    net.q.unmerge()
    assert adapter_layers(net) == before


def test_to_plain_lora_warm_starts_at_the_kept_components():
    """warm=True: the plain layers start at the masked super-network's update (the same outputs), with balanced
    factors; a kept rank whose component has no singular value keeps its fresh init instead of A = B = 0."""
    _, net = _svd_net()
    torch.manual_seed(1)
    with torch.no_grad():
        for lay in adapter_layers(net).values():
            lay.lora_A.normal_()
            lay.lora_B.normal_()
            lay.lora_E.normal_()
        net.ff.lora_E[1] = 0.0    # a kept component that contributes nothing
    masks = {"q": torch.tensor([1, 0, 1, 1]).bool(), "v": torch.zeros(4, dtype=torch.bool),
             "ff": torch.tensor([0, 1, 1, 0]).bool()}
    ref = copy.deepcopy(net)
    for n, m in masks.items():
        getattr(ref, n).set_rank_mask(m)
    to_plain_lora(net, masks, warm=True)
    net.eval()
    ref.eval()
    x = torch.randn(6, 8)
    torch.testing.assert_close(net(x), ref(x))
    q = net.q
    a, b = q.lora_A.detach(), q.lora_B.detach()
    assert not q.svd and q.r == 3
    torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0))             # balanced: √S on both sides
    ff = net.ff                                                           # rank 2 kept, an update of rank 1
    assert ff.r == 2 and torch.count_nonzero(ff.lora_B[:, 1]) == 0 and torch.count_nonzero(ff.lora_A[1]) > 0
    assert count_trainable(net, adapters_only=True) == 3 * 16 + 2 * 20


# ---- the workflow ---------------------------------------------------------------------------------------------
def test_workflow_parameter_budget_and_plain_retrain():
    build, val, data = _planted_builder()
    calls = []
    costs = rank_costs(build())                                   # 8 + 8 per rank in every module of the stack
    out = shaplora_workflow(build, _adam_train(calls, data), val, lambda m: None, loss_fn=mse,
                            budget=3 * 16 + 5, budget_unit="params", seed=1)
    spent = sum(costs[n] * int(m.sum()) for n, m in out["masks"].items())
    assert spent == 48 and out["budget_unit"] == "params" and len(calls) == 2
    model = out["model"]
    assert all(not m.svd for m in adapter_layers(model).values())
    assert count_trainable(model, adapters_only=True) == spent
    assert out["peft_rank_pattern"] == {n: m.r for n, m in adapter_layers(model).items()}


def test_workflow_svd_retrain_keeps_the_masks():
    build, val, data = _planted_builder()
    out = shaplora_workflow(build, _adam_train([], data), val, lambda m: None, loss_fn=mse, budget=2,
                            retrain="svd", seed=1)
    layers = adapter_layers(out["model"])
    assert all(m.svd and m.r == 3 for m in layers.values())
    assert {n: m.active_rank for n, m in layers.items() if m.active_rank} == out["peft_rank_pattern"]


def test_workflow_warm_retrain_continues_the_supernetwork():
    """retrain="warm": the super-network itself, as plain LoRA with the rank pattern, starting where the masked
    super-network was: its first retrain loss is the masked super-network's, not the base model's."""
    build, val, data = _planted_builder()
    calls, seen = [], []
    train = _adam_train(calls, data)

    def tracking(model):
        if calls:   # the retrain call: the model's loss before any step
            with torch.no_grad():
                seen.append(float(torch.stack([mse(model, b) for b in val]).mean()))
        train(model)
    out = shaplora_workflow(build, tracking, val, lambda m: None, loss_fn=mse, budget=3 * 16, budget_unit="params",
                            retrain="warm", seed=1)
    model = out["model"]
    assert all(not m.svd for m in adapter_layers(model).values()) and len(calls) == 2
    assert count_trainable(model, adapters_only=True) == 3 * 16
    assert out["peft_rank_pattern"] == {n: m.r for n, m in adapter_layers(model).items()}
    untrained = float(torch.stack([mse(build(), b) for b in val]).mean())
    assert seen[0] < 0.5 * untrained       # warm: starts far below a fresh model's loss


@pytest.mark.parametrize("kwargs, match", [
    ({"budget": 15, "budget_unit": "params"}, "budget"),            # below one rank's 16 parameters
    ({"budget": 12 * 16 + 1, "budget_unit": "params"}, "budget"),   # above all 12 ranks
    ({"budget": 40, "budget_unit": "weights"}, "budget_unit"),
    ({"r_target": 1, "budget_unit": "params"}, "r_target"),
    ({"budget": 2, "retrain": "merged"}, "retrain")])
def test_workflow_parameter_budget_checked_before_training(kwargs, match):
    build, val, data = _planted_builder()
    calls = []
    with pytest.raises(ValueError, match=match):
        shaplora_workflow(build, _adam_train(calls, data), val, lambda m: None, loss_fn=mse, **kwargs)
    assert calls == []


# ---- AdapterConfig.alpha_pattern ------------------------------------------------------------------------------
def test_alpha_pattern_sets_the_scale_per_module_and_is_checked():
    net = apply_adapters(Net(), ["q", "v"], r=4, alpha=4, rank_pattern={"v": 2}, alpha_pattern={"v": 8})
    assert net.q.scaling == 1.0 and net.v.scaling == 4.0
    with pytest.raises(ValueError, match=r"alpha_pattern\['q'\]"):
        apply_adapters(Net(), ["q"], alpha_pattern={"q": float("nan")})
    with pytest.raises(ValueError, match="alpha_pattern keys"):
        apply_adapters(Net(), ["q"], alpha_pattern={"zz": 2.0})
    with pytest.raises(TypeError, match="alpha_pattern"):
        apply_adapters(Net(), ["q"], alpha_pattern=[("q", 2.0)])


# ---- AdaLoRA's parameter budget -----------------------------------------------------------------------------
class Mixed(nn.Module):
    """Modules of different in + out, so a parameter budget is not a rank budget."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = LoRALinear(8, 8, 3, svd=True), LoRALinear(8, 20, 3, svd=True), \
            LoRALinear(20, 8, 3, svd=True)

    def forward(self, x):
        return self.c(torch.tanh(self.b(x + torch.tanh(self.a(x)))))


def test_adalora_parameter_budget_schedule_and_final_mask():
    from python_api.allocators.adalora import AdaLoRAAllocator
    torch.manual_seed(0)
    m = Mixed()
    budget = 2 * 17 + 29 + 5                                    # costs per rank: a 17, b 29, c 29
    alloc = AdaLoRAAllocator(m, budget=budget, budget_unit="params", total_step=24, tinit=2, tfinal=4, deltaT=2)
    assert alloc.init_bgt == 3 * 17 + 6 * 29 and alloc.target_bgt == budget
    assert alloc.state_dict()["schedule"]["budget_unit"] == "params"
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-2)
    g = torch.Generator().manual_seed(0)
    costs = {"a": 17, "b": 29, "c": 29}
    for step in range(24):
        x = torch.randn(16, 8, generator=g)
        nn.functional.mse_loss(m(x), torch.sin(3 * x)).backward()
        opt.step()
        pattern = alloc.update_and_allocate(step)
        if pattern is not None:
            spent = sum(costs[n] * sum(k) for n, k in pattern.items())
            assert spent <= alloc.budget_schedule(step)[0]
        opt.zero_grad()
    spent = sum(costs[n] * sum(k) for n, k in alloc.rank_pattern.items())
    assert budget - 17 < spent <= budget                       # within the cheapest rank of the budget
    for n, k in alloc.rank_pattern.items():                    # masked λ are zero
        assert all(float(v) == 0.0 for v, keep in zip(getattr(m, n).lora_E.detach(), k) if not keep)
    for kwargs in ({"budget": 16}, {"budget": 3 * 17 + 6 * 29 + 1}, {"target_r": 2}):
        with pytest.raises(ValueError, match="budget|target_r"):
            AdaLoRAAllocator(Mixed(), budget_unit="params", total_step=20, **kwargs)
    with pytest.raises(ValueError, match="budget_unit"):
        AdaLoRAAllocator(Mixed(), budget=3, budget_unit="flops", total_step=20)
