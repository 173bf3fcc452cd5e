"""A ShapLoRA run that fits its budget: SVD-form adapters that start as LoRA does (``svd_init="lora"``), so a short
super-network learns, and the two independent scorings on validation halves (``split_validation``)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from python_api.allocators.shaplora import shaplora_allocate, shaplora_workflow, shapley_sensitivity
from python_api.config import AdapterConfig
from python_api.layers import LoRALinear
from python_api.surgery import adapter_layers, apply_adapters
from tests.helpers import assert_close
from tests.python_api.allocators.test_shaplora_workflow import _adam_train, _planted_builder, mse


# ---- svd_init ---------------------------------------------------------------------------------------------------
def test_svd_init_lora_starts_as_lora_and_default_stays_adaloras():
    torch.manual_seed(0)
    lin = LoRALinear(48, 40, 6, svd=True, svd_init="lora")
    bound = 1 / math.sqrt(48)   # kaiming-uniform with a = √5, as plain LoRA's A
    top = float(lin.lora_A.detach().abs().max())
    assert 0.8 * bound < top <= bound
    assert torch.count_nonzero(lin.lora_B) == 0 and torch.equal(lin.lora_E, torch.ones(6))
    x = torch.randn(5, 48)
    assert_close(lin(x), x @ lin.weight.T + lin.bias, torch.float32)   # ΔW = 0 at the start
    ada = LoRALinear(48, 40, 6, svd=True)   # the default is PEFT's AdaLoRA init (kept: AdaLoRA matches PEFT)
    assert ada.svd_init == "adalora" and torch.count_nonzero(ada.lora_E) == 0
    assert 0.01 < float(ada.lora_A.detach().std()) < 0.03 and 0.01 < float(ada.lora_B.detach().std()) < 0.03


def test_svd_init_lora_gets_a_full_size_gradient_on_the_first_step():
    # the reason for the option: under AdaLoRA's init only E gets a gradient at first, scaled by two N(0, 0.02)
    # factors; under LoRA's, B's gradient is that of plain LoRA with the same A
    torch.manual_seed(1)
    x, g = torch.randn(16, 32), torch.randn(16, 24)
    svd = LoRALinear(32, 24, 4, svd=True, svd_init="lora")
    plain = LoRALinear(32, 24, 4)
    with torch.no_grad():
        plain.weight.copy_(svd.weight)
        plain.bias.copy_(svd.bias)
        plain.lora_A.copy_(svd.lora_A)
    (svd(x) * g).sum().backward()
    (plain(x) * g).sum().backward()
    assert_close(svd.lora_B.grad, plain.lora_B.grad, torch.float32)
    ada = LoRALinear(32, 24, 4, svd=True)
    (ada(x) * g).sum().backward()
    assert torch.count_nonzero(ada.lora_B.grad) == 0
    assert float(ada.lora_E.grad.abs().max()) < 0.1 * float(svd.lora_B.grad.abs().max())


def _lora_init(build):
    def built():
        net = build()
        with torch.no_grad():
            for m in adapter_layers(net).values():
                m.svd_init = "lora"
                m.reset_lora_parameters()
        return net
    return built


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_lora_initialised_supernetwork_learns_faster(seed):
    # the planted teacher-student task: what the super-network removes of the student's loss in a few Adam steps
    build, train_batches, val = _planted_builder(seed=seed)
    before = float(mse(build(), val).mean())
    gained = {}
    for init, make in (("adalora", build), ("lora", _lora_init(build))):
        net = make()
        _adam_train([], train_batches[0], steps=12, lr=1e-2)(net)
        with torch.no_grad():
            gained[init] = before - float(mse(net, val).mean())
    assert gained["lora"] > 2 * gained["adalora"] > 0, gained


@pytest.mark.parametrize("bad", ["LoRA", "gaussian", None, 1, np.array("lora"), ["lora"]])
def test_svd_init_is_checked_everywhere(bad):
    with pytest.raises(ValueError, match="svd_init"):
        LoRALinear(8, 8, 2, svd=True, svd_init=bad)
    with pytest.raises(ValueError, match="svd_init"):
        LoRALinear.from_linear(nn.Linear(8, 8), 2, svd=True, svd_init=bad)
    with pytest.raises(ValueError, match="svd_init"):
        AdapterConfig(target_modules=["0"], svd=True, svd_init=bad)
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="svd_init"):
        apply_adapters(model, ["0"], r=2, svd=True, svd_init=bad)
    assert type(model[0]) is nn.Linear   # nothing half-done


def test_svd_init_in_repr_and_for_layers_pickled_before_it_existed():
    lin = LoRALinear(8, 8, 2, svd=True, svd_init="lora")
    assert "svd_init=lora" in repr(lin) and "svd_init" not in repr(LoRALinear(8, 8, 2))
    del lin.__dict__["svd_init"]   # as unpickled from an older version: the class default (AdaLoRA's) applies
    lin.reset_lora_parameters()
    assert lin.svd_init == "adalora" and torch.count_nonzero(lin.lora_E) == 0


def test_apply_adapters_svd_init_reaches_every_layer_and_the_config():
    torch.manual_seed(0)
    model = apply_adapters(nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)]), ["0", "1", "2"], r=3, svd=True,
                           svd_init="lora")
    layers = adapter_layers(model)
    assert len(layers) == 3 and all(m.svd_init == "lora" and torch.equal(m.lora_E, torch.ones(3))
                                    for m in layers.values())
    cfg = AdapterConfig(target_modules=["q"], svd=True, svd_init="lora")
    assert AdapterConfig.from_dict(cfg.to_dict()).svd_init == "lora"
    assert AdapterConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "svd_init"}).svd_init == "adalora"
    # the default is not written: a checkpoint that does not use svd_init is what it was before the option existed
    assert "svd_init" not in AdapterConfig(target_modules=["q"], svd=True).to_dict()


# ---- split_validation -------------------------------------------------------------------------------------------
def _scored_supernet(seed=0):
    build, train_batches, val = _planted_builder(seed=seed)
    net = build()
    _adam_train([], train_batches[0], steps=80)(net)
    x, y = val
    return net, [(x[i:i + 50], y[i:i + 50]) for i in range(0, 512, 50)]   # 11 batches: 10 of 50, one of 12


def test_split_validation_scores_each_half_once_and_weights_by_examples():
    net, val = _scored_supernet()
    seen = []

    def counted(model, batch):
        seen.append(batch[0].shape[0])
        return mse(model, batch)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    out = shaplora_allocate(net, val, 6, loss_fn=counted, generator=torch.Generator().manual_seed(5),
                            split_validation=True)
    assert sum(seen) == 512   # every example scored once (the default scores each twice)
    # the same two scorings by hand: even batches, then odd ones, one generator in turn
    net.load_state_dict(state)
    from python_api.allocators.shaplora import to_merged_basis
    to_merged_basis(net)
    gen = torch.Generator().manual_seed(5)
    even = shapley_sensitivity(net, val[0::2], loss_fn=mse, generator=gen)
    odd = shapley_sensitivity(net, val[1::2], loss_fn=mse, generator=gen)
    n_even, n_odd = sum(b[0].shape[0] for b in val[0::2]), sum(b[0].shape[0] for b in val[1::2])
    assert (n_even, n_odd) == (262, 250)
    for name in even:
        assert_close(out["scores"][name], (n_even * even[name] + n_odd * odd[name]) / 512, torch.float64)
    assert -1.0 <= out["score_stability"] <= 1.0


def test_split_validation_needs_two_batches_and_a_bool_before_any_training():
    build, _, (x, y) = _planted_builder()
    calls = []
    with pytest.raises(ValueError, match="split_validation needs at least 2 validation batches"):
        shaplora_workflow(build, _adam_train(calls, (x, y)), [(x, y)], lambda m: None, loss_fn=mse, budget=3,
                          split_validation=True)
    with pytest.raises(TypeError, match="split_validation must be True or False"):
        shaplora_workflow(build, _adam_train(calls, (x, y)), [(x, y)], lambda m: None, loss_fn=mse, budget=3,
                          split_validation=1)
    assert calls == []
    net, val = _scored_supernet()
    with pytest.raises(ValueError, match="split_validation"):
        shaplora_allocate(net, val[:1], 6, loss_fn=mse, split_validation=True)


def test_fast_workflow_finds_the_planted_module():
    # a LoRA-initialised super-network, a short training and split scoring still find the one module the teacher
    # changed (module 1, a rank-1 delta): the retrain keeps its rank
    build, train_batches, val = _planted_builder(seed=1)
    x, y = val
    out = shaplora_workflow(_lora_init(build), _adam_train([], train_batches[0], steps=60), [
        (x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)], lambda m: None, loss_fn=mse, budget=1,
        split_validation=True, retrain="warm")
    assert {n: int(m.sum()) for n, m in out["masks"].items()} == {"layers.0": 0, "layers.1": 1, "layers.2": 0,
                                                                 "layers.3": 0}


def test_split_validation_weights_the_examples_each_half_scored():
    # examples with a non-finite loss are left out of a scoring: its half then weighs only what it scored
    net, val = _scored_supernet()
    poisoned = {id(val[1][0])}

    def loss(model, batch):
        out = mse(model, batch)
        if id(batch[0]) in poisoned:
            out = torch.cat([out[:10], torch.full_like(out[10:], float("nan"))])
        return out
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="skipped 40 of 250"):
        out = shaplora_allocate(net, val, 6, loss_fn=loss, generator=torch.Generator().manual_seed(2),
                                split_validation=True)
    net.load_state_dict(state)
    from python_api.allocators.shaplora import to_merged_basis
    to_merged_basis(net)
    gen = torch.Generator().manual_seed(2)
    even = shapley_sensitivity(net, val[0::2], loss_fn=loss, generator=gen)
    with pytest.warns(RuntimeWarning):
        odd = shapley_sensitivity(net, val[1::2], loss_fn=loss, generator=gen)
    for name in even:
        assert_close(out["scores"][name], (262 * even[name] + 210 * odd[name]) / 472, torch.float64)


class _Batch:   # a batch type whose size cannot be inferred: the permutation mode never needs it
    def __init__(self, x, y):
        self.x, self.y = x, y


def test_split_validation_in_permutation_mode_needs_no_batch_size_and_names_an_empty_half():
    net, val = _scored_supernet()

    def loss(model, b):
        return mse(model, (b.x, b.y))
    custom = [_Batch(*b) for b in val[:4]]
    out = shaplora_allocate(net, custom, 6, loss_fn=loss, mode="permutation", split_validation=True,
                            generator=torch.Generator().manual_seed(0))
    assert sum(int(m.sum()) for m in out["masks"].values()) == 6
    net, val = _scored_supernet()
    empty = [val[0], (val[1][0][:0], val[1][1][:0]), val[2], (val[3][0][:0], val[3][1][:0])]
    with pytest.raises(ValueError, match="in the odd-numbered validation batches, batches is empty"):
        shaplora_allocate(net, empty, 6, loss_fn=mse, split_validation=True)


def test_split_validation_names_a_half_whose_every_loss_is_non_finite():
    net, val = _scored_supernet()
    odd = {id(b[0]) for b in val[1::2]}

    def loss(model, batch):
        out = mse(model, batch)
        return out * float("nan") if id(batch[0]) in odd else out
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="split_validation: in the odd-numbered validation batches, every"):
        shaplora_allocate(net, val, 6, loss_fn=loss, split_validation=True)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())   # given back as it came


@pytest.mark.parametrize("warm", [False, True])
def test_to_plain_lora_keeps_the_supernetworks_adapter_dtype(warm):
    from python_api.allocators.shaplora import to_plain_lora
    model = apply_adapters(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), ["0", "1"], r=3, svd=True,
                           svd_init="lora", adapter_dtype=torch.float64)
    to_plain_lora(model, {"0": torch.tensor([1, 1, 0]), "1": torch.tensor([1, 0, 0])}, warm=warm)
    layers = adapter_layers(model)
    assert {m.lora_A.dtype for m in layers.values()} == {torch.float64} and not any(m.svd for m in layers.values())


def test_reset_switches_every_rank_on_and_is_refused_on_a_merged_layer():
    lin = LoRALinear(8, 8, 4, svd=True, svd_init="lora", device="meta").to_empty(device="cpu")
    with torch.no_grad():
        lin.rank_mask.copy_(torch.tensor([True, False, False, True]))   # what the memory might hold
        lin.weight.normal_()
        lin.bias.zero_()
    lin.reset_lora_parameters()
    assert lin.active_rank == 4 and torch.equal(lin.lora_E, torch.ones(4))
    with torch.no_grad():
        lin.lora_B.normal_()
    lin.merge()
    w = lin.weight.clone()
    with pytest.raises(RuntimeError, match="unmerge"):
        lin.reset_lora_parameters()
    assert torch.equal(lin.weight, w) and torch.count_nonzero(lin.lora_B) > 0
