"""Allocators on degenerate input (issue #14, class 5): each test reproduces one reported fault."""
import math
import signal
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import python_api as lk
from python_api.allocators import alphalora, shaplora
from python_api.allocators.alphalora import allocate_experts, alpha_hill, layer_alphas
from python_api.allocators.sensitivity import SensitivityTracker
from lora_kernels.spectra.alpha import eigenvalues


class Blocks(nn.Module):
    """``layers.i.proj`` blocks whose weights the test sets."""

    def __init__(self, weights):
        super().__init__()
        self.layers = nn.ModuleList()
        for w in weights:
            blk = nn.Module()
            blk.proj = nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                blk.proj.weight.copy_(w)
            self.layers.append(blk)


def orthogonal(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0].float()


def gaussian(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


# ---- alpha_hill / layer_alphas --------------------------------------------------------------------------------
@pytest.mark.parametrize("xmin", alphalora.XMIN_MODES)
def test_alpha_hill_constant_spectrum_is_nan_with_warning(xmin):
    # was: inf in faithful mode (the docstring promised 0.0), no warning
    with pytest.warns(RuntimeWarning, match="degenerate"):
        a = alpha_hill(torch.full((16,), 3.0, dtype=torch.float64), xmin=xmin)
    assert math.isnan(a)


def test_orthogonal_and_rank1_spectra_are_flagged():
    ev_orth = eigenvalues([orthogonal(32)])[0]
    u, v = gaussian(32, 1, 1), gaussian(1, 48, 2)
    ev_r1 = eigenvalues([u @ v])[0]
    for ev in (ev_orth, ev_r1):   # was: α ≈ 8.5e6 for the orthogonal one, a fit to 1e-14 round-off for rank 1
        with pytest.warns(RuntimeWarning, match="degenerate"):
            assert math.isnan(alpha_hill(ev, name="w"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = alpha_hill(eigenvalues([gaussian(32, 48)])[0])
    assert 1.0 < a < 100.0


def test_orthogonal_layer_does_not_take_every_expert():
    weights = [gaussian(24, 40, s) for s in range(3)] + [orthogonal(24)]
    model = Blocks(weights)
    with pytest.warns(RuntimeWarning, match=r"layers\.3\.proj"):
        a, per, deg = layer_alphas(model, return_matrix_alphas=True, return_degenerate=True)
    assert list(deg) == ["layers.3.proj"] and math.isnan(per["layers.3.proj"])
    assert a[3] == max(a[:3])                                     # clamped to the largest measured layer alpha
    n = allocate_experts(a, 16)
    assert sum(n) == 16 and n[3] < 16 and min(n) >= 1           # was: [0, 0, 0, 16]


def test_layer_alphas_all_degenerate_is_a_clear_error():
    with pytest.raises(ValueError, match=r"layers\.0\.proj.*layers\.1\.proj"):
        layer_alphas(Blocks([orthogonal(8, 0), orthogonal(8, 1)]))


def test_layer_alphas_nan_weight_names_the_module():
    model = Blocks([gaussian(8, 12, 0), gaussian(8, 12, 1)])
    with torch.no_grad():
        model.layers[1].proj.weight[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.1\.proj\.weight contains NaN"):   # was: _LinAlgError
        layer_alphas(model)


def test_eigenvalues_nan_matrix_is_a_value_error():
    w = gaussian(6, 9)
    w[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"mats\[1\] contains NaN or Inf"):   # was: _LinAlgError
        eigenvalues([gaussian(6, 9), w])


def test_layer_alphas_empty_weight_names_the_module():
    model = Blocks([gaussian(8, 12, 0), torch.empty(0, 12)])
    with pytest.raises(ValueError, match=r"layers\.1\.proj\.weight has an empty dimension"):  # was: "mats[1]"
        layer_alphas(model)


# ---- allocate_experts -----------------------------------------------------------------------------------------
def _alarm(seconds):
    def boom(*_):
        raise TimeoutError(f"allocate_experts did not return within {seconds} s")
    signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)


@pytest.mark.parametrize("repair", ["faithful", "largest_remainder"])
@pytest.mark.parametrize("alphas,beta", [([0.1, 0.2, 0.3], 2000.0), ([1e-300, 2e-300, 3.0], 50.0),
                                         ([1e-5, 2e-5], 80.0), ([1e300, 2.0], 3.0)])
def test_allocate_experts_underflow_and_overflow(alphas, beta, repair):
    # was: INT64_MIN counts, a hang, or "alpha**beta overflows"
    _alarm(10)
    try:
        n = allocate_experts(alphas, 10, beta=beta, repair=repair, min_experts=0)
    finally:
        signal.alarm(0)
    assert sum(n) == 10 and min(n) >= 0
    assert n[int(np.argmax(alphas))] == max(n)                     # the largest α^β gets the most experts


def test_allocate_experts_faithful_never_goes_negative():
    # was [2, 1, 1, -1]: the published repair takes from an empty layer when α^β ≪ 1
    n = allocate_experts([0.4560253254458668, 0.28508637609960924, 0.2933845983138736, 0.10512358871648884], 3,
                         beta=2.0, min_experts=0)
    assert n == [2, 1, 0, 0]     # the published loop's choice, among the non-empty layers


def test_allocate_experts_numpy_ints_and_default_min():
    n = allocate_experts(np.array([2.0, 3.0, 4.0]), np.int64(9), min_experts=np.int32(2))
    assert n == allocate_experts([2.0, 3.0, 4.0], 9, min_experts=2) and all(type(v) is int for v in n)
    assert min(allocate_experts([2.0, 2.0, 9.0], 6, beta=8.0)) == alphalora.DEFAULT_MIN_EXPERTS == 1
    with pytest.raises(TypeError, match="total"):
        allocate_experts([2.0, 3.0], 4.0)


def test_cli_and_demo_read_the_library_default(monkeypatch):
    from python_api.app import cli, demo

    seen = {}
    monkeypatch.setattr(demo, "allocation_report", lambda method, cfg: seen.update(cfg=cfg))
    assert cli.main(["alloc", "--method", "alphalora", "--quick"]) == 0
    assert seen["cfg"].min_experts == alphalora.DEFAULT_MIN_EXPERTS
    assert cli.main(["alloc", "--method", "alphalora", "--quick", "--min-experts", "0"]) == 0
    assert seen["cfg"].min_experts == 0
    assert demo._min_experts_kw(demo.DemoConfig()) == {}          # None: the library's default applies


# ---- allocate_ranks -------------------------------------------------------------------------------------------
def test_allocate_ranks_never_keeps_a_nan_rank_and_refuses_inf():
    # was: the NaN rank tied with −inf and, first in order, was kept
    m = shaplora.allocate_ranks({"a": torch.tensor([float("nan"), 0.5]), "b": torch.tensor([0.1])}, 2)
    assert m["a"].tolist() == [False, True] and m["b"].tolist() == [True]
    for bad in (float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"'b'"):
            shaplora.allocate_ranks({"a": torch.tensor([0.5]), "b": torch.tensor([0.1, bad])}, 1)


# ---- shapley_sensitivity --------------------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 4)
        lk.apply_adapters(self, ["fc"], r=3, alpha=3.0)
        with torch.no_grad():
            self.fc.lora_B.normal_()
        self.double()  # fp64: dropping a row must not change the others' rounding (fp32 matmul blocking does)


def toy_loss(model, batch):
    x, y = batch
    return ((model.fc(x) - y) ** 2).mean(1)


def toy_batches(n_batches=3, b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 6, generator=g, dtype=torch.float64), torch.randn(b, 4, generator=g, dtype=torch.float64))
            for _ in range(n_batches)]


@pytest.mark.parametrize("mode", ["taylor", "permutation", "exact"])
def test_shapley_skips_non_finite_examples_with_a_warning(mode):
    batches = toy_batches()
    clean = [(x[1:], y[1:]) if i == 0 else (x, y) for i, (x, y) in enumerate(batches)]
    batches[0][0][0, 2] = float("nan")                             # one poisoned validation example
    kw = dict(loss_fn=toy_loss, q=1.0) if mode == "taylor" else dict(loss_fn=toy_loss)
    with pytest.warns(RuntimeWarning, match="skipped 1 of 12"):
        got = shaplora.shapley_sensitivity(Toy(), batches, mode, generator=torch.Generator().manual_seed(0), **kw)
    ref = shaplora.shapley_sensitivity(Toy(), clean, mode, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.isfinite(got["fc"]).all()                         # was: every score NaN, no warning
    torch.testing.assert_close(got["fc"], ref["fc"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["taylor", "exact"])
def test_shapley_all_examples_non_finite_is_a_clear_error(mode):
    batches = [(torch.full((2, 6), float("inf"), dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64))]
    with pytest.raises(ValueError, match="non-finite"):
        shaplora.shapley_sensitivity(Toy(), batches, mode, loss_fn=toy_loss)


# ---- SensitivityTracker ---------------------------------------------------------------------------------------
def test_tracker_skips_a_nan_weight_and_names_the_module():
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 3))
    lk.apply_adapters(model, ["0", "1"], r=2, alpha=2.0)
    tr = SensitivityTracker(model)

    def step():
        model.zero_grad()
        model(torch.randn(4, 5)).square().sum().backward()
        return tr.update()

    assert not bool(step())
    before = {k: v.clone() for k, v in tr.state_dict().items() if k in ("ipt", "unc", "scores")}
    with torch.no_grad():
        model[1].lora_A[0, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"non-finite weight.*'1'"):
        assert bool(step())                                        # was: False, and NaN state from then on
    after = tr.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k                         # state untouched
    assert tr.skipped_steps == 1
    with torch.no_grad():
        model[1].lora_A[0, 1] = 0.3
    assert not bool(step()) and torch.isfinite(tr.scores).all()


# ---- AdaLoRAAllocator ------------------------------------------------------------------------------------------
def test_adalora_zero_grad_before_update_warns_and_still_keeps_the_budget():
    # The wrong loop order (zero_grad(set_to_none) before update_and_allocate): every update sees no gradient.
    # It warns and skips the update; the masks then face all-tied scores and must still keep exactly the budget
    # (PEFT's "score > k-th smallest" rule masked every rank).
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    lk.apply_adapters(model, ["0", "2"], r=4, svd=True)
    alloc = lk.AdaLoRAAllocator(model, budget=5, total_step=12, tinit=2, tfinal=4, deltaT=2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(0)
    with pytest.warns(RuntimeWarning, match="no tracked adapter tensor has a gradient"):
        for step in range(12):
            model(torch.randn(4, 6, generator=g)).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            alloc.update_and_allocate(step)
    assert alloc.tracker.skipped_steps > 0
    assert sum(sum(row) for row in alloc.rank_pattern.values()) == 5


@pytest.mark.parametrize("budget", [1, 3, 7, 8])
def test_adalora_tied_scores_keep_exactly_the_budget(budget):
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    lk.apply_adapters(model, ["0", "2"], r=4, svd=True)
    alloc = lk.AdaLoRAAllocator(model, budget=2, total_step=12, tinit=2, tfinal=4, deltaT=2)
    alloc.tracker.scores = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.5, 0.0, 0.2, 0.5])
    pattern = alloc.mask_to_budget(budget)
    flags = [f for row in pattern.values() for f in row]
    assert sum(flags) == budget
    # the best scores first, ties by position: the same set as PEFT's rule wherever that rule keeps the budget
    want = sorted(range(8), key=lambda i: (-float(alloc.tracker.scores[i]), i))[:budget]
    assert [i for i, f in enumerate(flags) if f] == sorted(want)


# ---- rank masks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,match", [([1, 0, 1], "length must equal the layer's rank r=4"),
                                       ([1, 0, 1, 0, 1, 0, 1, 0], "length must equal"),
                                       ([0.5, 1, 1, 0], "must be boolean or 0/1")])
@pytest.mark.parametrize("how", ["apply_rank_masks", "to_plain_lora"])
def test_bad_mask_for_the_last_module_changes_nothing_and_names_it(bad, match, how):
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    lk.apply_adapters(model, ["0", "2", "4"], r=4, svd=True)
    masks = {"0": [1, 0, 1, 0], "2": [1, 1, 0, 0], "4": bad}
    before = [(n, type(x), x.rank_mask.clone()) for n, x in lk.adapter_layers(model).items()]
    with pytest.raises(ValueError, match=r"masks\['4'\]: " + match):
        getattr(shaplora, how)(model, masks)
    assert [(n, type(x)) for n, x in lk.adapter_layers(model).items()] == [(n, t) for n, t, _ in before]
    assert all(torch.equal(x.rank_mask, m) for (_, _, m), x in zip(before, lk.adapter_layers(model).values()))


@pytest.mark.parametrize("kept", [[0, 4], [-1], [1, 1], [0.0]])
def test_rank_pattern_with_bad_indices_is_refused(kept):
    cfg = {"format": "lora_kernels.rank_pattern", "modules": {"fc": {"r_init": 4, "kept": kept}}}
    with pytest.raises(ValueError, match=r"module 'fc': kept must list distinct rank indices in 0..3"):
        shaplora.masks_from_config(cfg)


@pytest.mark.parametrize("kw,name", [({"tfinal": -10}, "tfinal"), ({"tinit": -1}, "tinit"),
                                     ({"total_step": 20.7}, "total_step"), ({"deltaT": 2.5}, "deltaT"),
                                     ({"total_step": True}, "total_step"), ({"deltaT": 0}, "deltaT")])
def test_adalora_schedule_arguments_are_ints_in_range(kw, name):
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    lk.apply_adapters(model, ["0", "2"], r=4, svd=True)
    args = {"budget": 5, "total_step": 20, "tinit": 2, "tfinal": 4, "deltaT": 2, **kw}
    with pytest.raises(ValueError, match=f"{name} must be an int >= "):
        lk.AdaLoRAAllocator(model, **args)


def test_to_plain_lora_needs_a_mask_for_every_adapter_layer():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    lk.apply_adapters(model, ["0", "2"], r=4, svd=True)
    with pytest.raises(ValueError, match=r"needs a mask for every adapter layer; none for \['2'\]"):
        shaplora.to_plain_lora(model, {"0": [1, 0, 1, 0]})
    assert all(x.svd for x in lk.adapter_layers(model).values())
