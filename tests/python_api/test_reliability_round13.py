"""Careful-misuse round 13: each test failed on the code before its fix (a wrong result with no error, an unclear
error, or a layer left half-changed after an error)."""
import io
import math
import warnings

import pytest
import torch
from torch import nn

import python_api as lk
from python_api.allocators.adalora import AdaLoRAAllocator
from python_api.layers import LoRALinear
from python_api.moe import MoELoRALinear


def _expected(layer, x):
    return x @ layer.weight.T + layer.bias + layer.scaling * ((x @ layer.lora_A.T) * layer.rank_mask) @ layer.lora_B.T


def _layer(seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(8, 6, 4)
    nn.init.normal_(layer.lora_B)
    return layer


# ---- LoRALinear: the cached active ranks always follow the current mask ------------------------------------------
def test_mask_edited_through_data_is_followed_on_cpu():
    layer, x = _layer(), torch.randn(3, 8)
    layer(x)                                   # caches "every rank on"
    layer.rank_mask.data[1] = False            # .data has its own version counter
    assert torch.allclose(layer(x), _expected(layer, x), atol=1e-5)


def test_mask_loaded_with_assign_is_followed():
    """load_state_dict(assign=True) replaces the mask tensor; the new one may reuse the freed one's address and
    version, so a key of (address, version) matched a stale cache (wrong outputs in ~30% of rounds)."""
    layer, x = _layer(), torch.randn(3, 8)
    blobs = []
    for m in ([1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 1, 1]):
        layer.set_rank_mask(m)
        b = io.BytesIO()
        torch.save(layer.state_dict(), b)
        blobs.append(b.getvalue())
    wrong = 0
    for _ in range(100):
        layer.load_state_dict(torch.load(io.BytesIO(blobs[0])), assign=True)
        layer(x)                                             # caches blob 0's mask
        layer.load_state_dict(torch.load(io.BytesIO(blobs[1])), assign=True)
        layer.load_state_dict(torch.load(io.BytesIO(blobs[2])), assign=True)   # may land at blob 0's address
        wrong += not torch.allclose(layer(x), _expected(layer, x), atol=1e-5)
    assert wrong == 0


def test_state_dict_mask_must_be_zero_one():
    layer = _layer()
    sd = dict(layer.state_dict())
    sd["rank_mask"] = torch.tensor([0.5, 0.0, 2.0, -1.0])
    with pytest.raises(ValueError, match="rank_mask"):
        layer.load_state_dict(sd)
    assert layer.rank_mask.tolist() == [True] * 4          # nothing loaded
    sd["rank_mask"] = torch.tensor([1.0, 0.0, 1.0, 1.0])   # 0/1 floats load, as set_rank_mask takes them
    layer.load_state_dict(sd)
    assert layer.rank_mask.tolist() == [True, False, True, True]


def test_non_strict_adapter_only_load_into_a_merged_layer_loads():
    """torch passes strict=True to every module and checks strictness at the end: a non-strict load with keys
    missing (an adapter-only dict) must load into a merged layer like into an unmerged one."""
    src = _layer(1)
    sd = {k: v for k, v in src.state_dict().items() if k.startswith("lora_")}
    merged, plain = _layer(), _layer()
    merged.merge()
    merged.load_state_dict(sd, strict=False)
    plain.load_state_dict(sd, strict=False)
    assert merged.merged and torch.equal(merged.lora_B, src.lora_B)
    x = torch.randn(3, 8)
    assert torch.allclose(merged(x), plain(x), atol=1e-5)


def test_failed_load_leaves_a_merged_layer_as_it_was():
    layer = _layer()
    layer.merge()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    merged_w = layer.weight.clone()
    sd = dict(_layer(1).state_dict())
    sd["lora_B"] = torch.randn(6, 3)                        # wrong shape: load_state_dict raises
    with pytest.raises(RuntimeError, match="lora_B"):
        layer.load_state_dict(sd)
    assert layer.merged and torch.equal(layer.weight, merged_w)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("bad", [torch.randn(4, 8, requires_grad=True), nn.Parameter(torch.ones(4, 8).long(),
                                                                                     requires_grad=False)])
def test_shared_factor_must_be_a_float_parameter(bad):
    with pytest.raises(TypeError, match="lora_A must be an nn.Parameter"):
        LoRALinear(8, 6, 4, lora_A=bad)
    with pytest.raises(TypeError, match="lora_B must be an nn.Parameter"):
        LoRALinear(8, 4, 4, lora_B=bad)   # [4, 8] is not even B's shape: the type is named first


def test_svd_flag_must_be_a_bool():
    with pytest.raises(TypeError, match="svd must be True or False"):
        LoRALinear(8, 6, 4, svd="no")


def test_repr_on_the_meta_device():
    assert "active_rank=?" in repr(LoRALinear(8, 6, 4, device="meta"))


def test_float64_layer_is_left_alone_by_cpu_autocast():
    """nn.Linear keeps float64 under autocast; the adapter layer cast it to bf16 (error ~6e-3)."""
    layer = LoRALinear(8, 6, 4, dtype=torch.float64)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 8, dtype=torch.float64)
    y0 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1 = layer(x)
        y32 = LoRALinear(8, 6, 4)(x.float())
    assert y1.dtype == torch.float64 and torch.equal(y1, y0)
    assert y32.dtype == torch.bfloat16    # float32 is still cast


# ---- AdaLoRA: the target budget is applied even when the final step is skipped ------------------------------------
class _Blk(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.v(torch.relu(self.q(x)))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Blk(), _Blk()])

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return x


def _adalora(steps):
    torch.manual_seed(0)
    model = _Net()
    lk.apply_adapters(model, ["q", "v"], r=8, svd=True)
    alloc = AdaLoRAAllocator(model, budget=4, total_step=10, tinit=1, tfinal=3)   # final mask at step 7
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(16, 8)
    for step in steps:
        model(x).square().mean().backward()
        opt.step()
        alloc.update_and_allocate(step)
        opt.zero_grad()
    kept = sum(int((m.lora_E != 0).sum()) for m in lk.adapter_layers(model).values())
    return alloc, kept


def test_adalora_final_step_skipped_still_reaches_the_target_budget():
    with pytest.warns(RuntimeWarning, match="final mask step 7 was never given"):
        alloc, kept = _adalora(range(0, 12, 4))       # steps 0, 4, 8: step 7 never comes
    assert kept == alloc.target_bgt == 4
    assert alloc.state_dict()["final_applied"] is True


def test_adalora_final_step_skipped_before_any_mask_still_reaches_the_target():
    """No mask before the skipped final step (deltaT longer than the steps seen): the allocator has scores all the
    same, so the target is applied, not the 'fresh allocator' error."""
    torch.manual_seed(0)
    model = _Net()
    lk.apply_adapters(model, ["q", "v"], r=8, svd=True)
    alloc = AdaLoRAAllocator(model, budget=2, total_step=10, tinit=1, tfinal=3, deltaT=5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(16, 8)
    with pytest.warns(RuntimeWarning, match="never given"):
        for step in (0, 4, 8):
            model(x).square().mean().backward()
            opt.step()
            alloc.update_and_allocate(step)
            opt.zero_grad()
    assert sum(int((m.lora_E != 0).sum()) for m in lk.adapter_layers(model).values()) == 2


def test_adalora_refuses_a_step_that_goes_back():
    with pytest.raises(ValueError, match="went back from 5"):
        _adalora([4, 5, 0])


def test_adalora_normal_run_unchanged_and_final_not_recomputed():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alloc, kept = _adalora(range(10))
    assert kept == 4
    alloc, _ = _adalora(range(8))         # ends at the final step, 7
    pattern = alloc.rank_pattern
    alloc.update_and_allocate(7)          # the final step again: its pattern stays (the tracker was reset there, so
    assert alloc.rank_pattern == pattern  # a second final mask would rank all-zero scores by position)


def test_adalora_state_without_the_flag_loads_as_before():
    alloc, _ = _adalora(range(10))
    state = alloc.state_dict()
    state.pop("final_applied")
    fresh, _ = _adalora([])
    fresh.load_state_dict(state)
    assert fresh._final_applied is True


def test_adalora_state_saved_mid_schedule_without_the_flag_still_reaches_the_target():
    """An older state saved between tinit and the final step holds an intermediate pattern (above the target):
    resumed, the final mask must still be applied at the final step."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    lk.apply_adapters(model, ["0", "1", "2", "3"], r=8, svd=True)
    kw = dict(target_r=1, total_step=40, tinit=20, tfinal=5, deltaT=7)
    alloc = AdaLoRAAllocator(model, **kw)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(16, 16)

    def step(a, s):
        model(x).square().mean().backward()
        opt.step()
        a.update_and_allocate(s)
        opt.zero_grad()
    for s in range(25):
        step(alloc, s)
    state = alloc.state_dict()
    state.pop("final_applied")
    assert sum(sum(k) for k in state["rank_pattern"].values()) > 4   # an intermediate mask
    resumed = AdaLoRAAllocator(model, **kw)
    resumed.load_state_dict(state)
    for s in range(25, 40):
        step(resumed, s)
    assert sum(int((m.lora_E != 0).sum()) for m in lk.adapter_layers(model).values()) == 4


# ---- AlphaLoRA: adapted layers count with their base weight --------------------------------------------------------
def test_layer_alphas_reads_adapted_layers_base_weights():
    torch.manual_seed(0)
    model = _Net()
    plain = lk.layer_alphas(model, ["q", "v"], return_matrix_alphas=True)[1]
    lk.apply_adapters(model, ["q"], r=2)
    part = lk.layer_alphas(model, ["q", "v"], return_matrix_alphas=True)[1]
    assert sorted(part) == sorted(plain) and all(math.isclose(part[k], plain[k], rel_tol=1e-9) for k in plain)
    torch.manual_seed(0)
    model = lk.apply_adapters(_Net(), ["q", "v"], r=2)     # every target adapted: was "no nn.Linear ... matches"
    full = lk.layer_alphas(model, ["q", "v"], return_matrix_alphas=True)[1]
    assert sorted(full) == sorted(plain) and all(math.isclose(full[k], plain[k], rel_tol=1e-9) for k in plain)
    layer = lk.adapter_layers(model)["layers.0.q"]
    nn.init.normal_(layer.lora_B)
    layer.merge()
    with pytest.raises(ValueError, match=r"layers\.0\.q is a merged adapter layer"):
        lk.layer_alphas(model, ["q", "v"])


def test_alpha_hill_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="eps must be"):
        lk.alpha_hill([1.0, 2.0, 3.0, 5.0], eps=-1.0)
    with pytest.raises(ValueError, match="eps must be"):
        lk.alpha_hill([1.0, 2.0, 3.0, 5.0], eps=float("nan"))
    with pytest.raises(ValueError, match="σ² ≥ 0"):
        lk.alpha_hill([-4.0, 1.0, 2.0, 3.0])
    # eigenvalues computed in float32 and handed over as float64: eps says so, and their round-off is accepted
    torch.manual_seed(0)
    w = torch.randn(128, 512)
    lam = torch.linalg.eigvalsh(w.T @ w).double()
    assert float(lam.min()) < 0
    assert lk.alpha_hill(lam, eps=torch.finfo(torch.float32).eps) > 0
    lk.alpha_hill([-1e-12, 1.0, 2.0, 3.0, 5.0, 8.0])   # an eigensolver's round-off below zero is fine


# ---- MoE, sensitivity ------------------------------------------------------------------------------------------------
def test_moe_layer_with_no_input_features_runs_like_the_op():
    layer = MoELoRALinear(0, 6, 2, 2)
    y = layer(torch.randn(3, 0))
    assert y.shape == (3, 6) and torch.allclose(y, layer.bias.expand(3, 6))


def test_sensitivity_tracker_names_a_non_tensor_in_a_triplet():
    with pytest.raises(TypeError, match="adapter 'a': A must be a tensor"):
        lk.SensitivityTracker({"a": (None, [[0.0, 0.0]], torch.zeros(4, 2))})
    with pytest.raises(TypeError, match="adapter 'a': expected a"):
        lk.SensitivityTracker({"a": torch.zeros(2)})
