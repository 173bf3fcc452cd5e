import pytest
import torch
from torch import nn

from python_api import LoRALinear
from tests.helpers import assert_close


def make(r=4, svd=False, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = nn.Linear(24, 20, bias=bias)
    layer = LoRALinear.from_linear(lin, r, alpha=8, svd=svd)
    with torch.no_grad():
        layer.lora_B.normal_()
        if svd:
            layer.lora_E.normal_()
    return lin, layer


def test_from_linear_takes_weight_by_reference_and_freezes():
    lin, layer = make()
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.scaling == 2.0
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "rank_mask"}
    assert set(make(svd=True)[1].state_dict()) == {"weight", "bias", "lora_A", "lora_B", "lora_E", "rank_mask"}


def test_drop_in_equals_linear_at_init():
    torch.manual_seed(0)
    lin = nn.Linear(24, 20)
    layer = LoRALinear.from_linear(lin, 4)  # B = 0 at init, like LoRA
    x = torch.randn(3, 5, 24)
    assert torch.equal(layer(x), lin(x))


def test_pretrained_state_dict_loads():
    lin, layer = make()
    fresh = LoRALinear(24, 20, 4, alpha=8)
    missing, unexpected = fresh.load_state_dict(lin.state_dict(), strict=False)
    assert set(missing) == {"lora_A", "lora_B", "rank_mask"} and not unexpected
    assert torch.equal(fresh.weight, lin.weight)


@pytest.mark.parametrize("svd", [False, True])
def test_merge_unmerge_round_trip_exact(svd):
    lin, layer = make(svd=svd)
    layer.set_rank_mask([1, 0, 1, 1])
    x = torch.randn(7, 24)
    w0 = layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    assert_close(layer(x), y.double(), torch.float32, "merged")
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    assert torch.equal(layer(x), y)


def test_rank_mask_validation_and_cost_path():
    _, layer = make()
    with pytest.raises(ValueError, match="mask length must equal r=4"):
        layer.set_rank_mask([1, 0, 1])
    with pytest.raises(ValueError, match="boolean or 0/1"):
        layer.set_rank_mask([1, 2, 0, 1])
    layer.set_rank_mask(torch.tensor([True, False, False, True]))
    assert layer.active_rank == 2
    x = torch.randn(5, 24, requires_grad=True)
    layer(x).sum().backward()
    assert torch.count_nonzero(layer.lora_A.grad[1:3]) == 0
    # the mask is a buffer: a state-dict load updates the compaction cache
    sd = layer.state_dict()
    sd["rank_mask"] = torch.tensor([True, True, True, False])
    layer.load_state_dict(sd)
    assert layer.active_rank == 3
    assert layer._active_indices().tolist() == [0, 1, 2]


def test_rank_policy():
    with pytest.raises(ValueError, match=r"r=9 exceeds min\(in_features, out_features\)=8"):
        LoRALinear(8, 30, 9)
    with pytest.raises(ValueError, match="r must be >= 1"):
        LoRALinear(8, 30, 0)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        LoRALinear.from_linear(nn.Conv1d(3, 3, 1), 2)


def test_token_gate_and_empty_batch():
    _, layer = make()
    x = torch.randn(2, 3, 24)
    g = torch.rand(6, 4)
    layer.set_token_gate(g)
    y = layer(x)
    layer.set_token_gate(None)
    expected = x @ layer.weight.t() + layer.bias + layer.scaling * ((x.reshape(6, 24) @ layer.lora_A.t()) * g
                                                                    @ layer.lora_B.t()).reshape(2, 3, 20)
    assert_close(y, expected.double(), torch.float32, "token-gated")
    assert layer(torch.randn(0, 24)).shape == (0, 20)


def test_half_base_keeps_fp32_adapters():
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoRALinear.from_linear(lin, 2)
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    y = layer(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32
