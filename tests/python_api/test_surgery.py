"""apply_adapters / count_trainable / merge: plain nn.Module and tiny Hugging Face models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from python_api import LoRALinear, apply_adapters, count_trainable, merge_adapters, unmerge_adapters
from python_api.surgery import CONFIG_ATTR, adapter_layers, apply_from_config
from tests.helpers import assert_close, randn
from tests.python_api.toy_models import randomize_b, tiny_bert, tiny_llama, toy


def test_replaces_targets_freezes_base_and_keeps_output():
    m = toy()
    x = randn(2, 5, 16)
    y0 = m(x)
    apply_adapters(m, ["q_proj", "v_proj"], r=4, alpha=8)
    layers = adapter_layers(m)
    assert list(layers) == [f"layers.{i}.{p}" for i in range(3) for p in ("q_proj", "v_proj")]
    assert all(isinstance(v, LoRALinear) and v.scaling == 2.0 for v in layers.values())
    assert isinstance(m.layers[0].k_proj, nn.Linear) and not isinstance(m.layers[0].k_proj, LoRALinear)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in layers for ab in "AB"}
    assert_close(m(x), y0.double(), name="B=0 at init leaves the output unchanged")


@pytest.mark.parametrize("spec,expect", [
    (["layers.1.q_proj"], ["layers.1.q_proj"]),                     # full name
    (r"layers\.[02]\.o_proj", ["layers.0.o_proj", "layers.2.o_proj"]),  # regex on the full name
    (["k_proj"], [f"layers.{i}.k_proj" for i in range(3)]),          # last component
])
def test_target_matching(spec, expect):
    m = apply_adapters(toy(), spec, r=2)
    assert list(adapter_layers(m)) == expect


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        apply_adapters(toy(), ["nope"], r=2)
    m = apply_adapters(toy(), ["q_proj"], r=2)
    with pytest.raises(ValueError, match="already a LoRALinear"):
        apply_adapters(m, ["q_proj"], r=2)
    with pytest.raises(ValueError, match="share must be"):
        apply_adapters(toy(), ["q_proj"], r=2, share="C")
    with pytest.raises(ValueError, match="share_scope"):
        apply_adapters(toy(), ["q_proj"], r=2, share="A", share_scope="global")
    with pytest.raises(ValueError, match="r=32 exceeds"):
        apply_adapters(toy(), ["q_proj"], r=32)


def test_gpt2_conv1d_is_refused():
    from transformers.pytorch_utils import Conv1D

    m = nn.Sequential()
    m.add_module("c_attn", Conv1D(48, 16))
    with pytest.raises(TypeError, match="Conv1D"):
        apply_adapters(m, ["c_attn"], r=2)


def test_rank_pattern_masks_svd_and_head():
    m = apply_adapters(toy(), ["q_proj", "o_proj"], r=4, rank_pattern={"layers.1.q_proj": 2, "o_proj": 3},
                       rank_masks={"layers.0.q_proj": [1, 0, 1, 0]}, svd=True, modules_to_save=["classifier"])
    L = adapter_layers(m)
    assert [L[f"layers.{i}.q_proj"].r for i in range(3)] == [4, 2, 4]
    assert all(L[f"layers.{i}.o_proj"].r == 3 for i in range(3))
    assert L["layers.0.q_proj"].active_rank == 2 and L["layers.0.q_proj"].lora_E is not None
    assert m.classifier.weight.requires_grad and m.classifier.bias.requires_grad
    head = 16 * 3 + 3
    adapters = sum(lay.r * (16 + 16) + lay.r for lay in L.values())   # A, B and E per layer
    adapters -= 2 * (16 + 16 + 1)   # layers.0.q_proj's two masked ranks never train: not counted
    assert count_trainable(m) == adapters + head
    assert count_trainable(m, adapters_only=True) == adapters


@pytest.mark.parametrize("share", [None, "A", "B", "AB"])
def test_count_formula_on_real_model(share):
    # One module type, L layers, d_in = 16, d_out = 8 (k_proj with d_kv = 8): the ALGORITHMS.md §4 formulas.
    L, r, din, dout = 3, 4, 16, 8
    m = apply_adapters(toy(d_kv=dout), ["k_proj"], r=r, share=share)
    want = {None: L * r * (din + dout), "A": r * din + L * r * dout, "B": L * r * din + r * dout,
            "AB": r * (din + dout)}[share]
    assert count_trainable(m) == want
    assert count_trainable(m) == len(torch.nn.utils.parameters_to_vector(
        [p for p in m.parameters() if p.requires_grad]))


@pytest.mark.parametrize("share,want", [(None, 294_912), ("A", 159_744), ("AB", 24_576)])
def test_roberta_base_reference_counts(share, want):
    # ShareLoRA paper's RoBERTa-base q+v r=8 figures: 0.295M -> 0.160M -> 0.025M. Meta device: no allocation.
    from transformers import RobertaConfig, RobertaModel
    with torch.device("meta"):
        m = RobertaModel(RobertaConfig(), add_pooling_layer=False)
    apply_adapters(m, ["query", "value"], r=8, share=share)
    assert count_trainable(m) == want
    assert round(want / 1e6, 3) == {None: 0.295, "A": 0.160, "AB": 0.025}[share]


@pytest.mark.parametrize("share,want", [(None, 33.55), ("A", 17.30), ("AB", 1.05)])
def test_llama7b_reference_counts(share, want):
    from transformers import LlamaConfig, LlamaModel
    cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008,
                      vocab_size=32000)
    with torch.device("meta"):
        m = LlamaModel(cfg)
    apply_adapters(m, ["q_proj", "v_proj"], r=64, share=share)
    assert round(count_trainable(m) / 1e6, 2) == want


@pytest.mark.parametrize("reversible", [False, True])
@pytest.mark.parametrize("share", [None, "A", "AB"])
def test_merge_matches_adapted_outputs(share, reversible):
    m = apply_adapters(toy(), ["q_proj", "k_proj", "v_proj", "o_proj"], r=4, share=share,
                       rank_masks={"layers.2.k_proj": [1, 1, 0, 1]})
    randomize_b(m)
    x = randn(2, 5, 16)
    with torch.no_grad():
        y = m(x)
        w_before = m.layers[1].q_proj.weight.clone()
        merge_adapters(m, reversible=reversible)
        assert not adapter_layers(m) and type(m.layers[1].q_proj) is nn.Linear
        assert_close(m(x), y.double(), torch.float32, name="merged")
    if reversible:
        unmerge_adapters(m)
        assert torch.equal(m.layers[1].q_proj.weight, w_before)
        assert len(adapter_layers(m)) == 12
        with torch.no_grad():
            assert torch.equal(m(x), y)
    else:
        with pytest.raises(ValueError, match="nothing to unmerge"):
            unmerge_adapters(m)


def test_merge_bf16_base_rounds_once():
    m = apply_adapters(toy(dtype=torch.bfloat16), ["q_proj"], r=4, share="A")
    randomize_b(m)
    lay = m.layers[0].q_proj
    want = (lay.weight.double() + lay.delta_weight().double()).to(torch.bfloat16)
    merge_adapters(m)
    assert torch.equal(m.layers[0].q_proj.weight, want)


def test_config_recorded_and_replayed():
    m = apply_adapters(toy(), ["q_proj", "k_proj", "v_proj"], r=4, share="A", share_scope="attention")
    cfg = getattr(m, CONFIG_ATTR)
    assert cfg["method"] == "sharelora" and cfg["share"] == "A" and cfg["r"] == 4
    assert cfg["sharing"] == {"layers.*.<qkv>.lora_A": [f"layers.{i}.{p}" for i in range(3)
                                                        for p in ("q_proj", "k_proj", "v_proj")]}
    import json
    json.dumps(cfg)
    m2 = apply_from_config(toy(), cfg)
    assert getattr(m2, CONFIG_ATTR)["sharing"] == cfg["sharing"]
    assert count_trainable(m2) == count_trainable(m)


@pytest.mark.parametrize("share", [None, "A", "AB"])
def test_hf_bert(share):
    m = tiny_bert()
    ids = torch.randint(0, 100, (2, 7))
    y0 = m(ids).last_hidden_state
    apply_adapters(m, ["query", "value"], r=4, share=share)
    assert_close(m(ids).last_hidden_state, y0.double(), name="init")
    randomize_b(m)
    m.train()
    out = m(ids).last_hidden_state
    out.square().mean().backward()
    for lay in adapter_layers(m).values():
        assert lay.lora_A.grad is not None and lay.lora_B.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        y = m(ids).last_hidden_state
        merge_adapters(m)
        assert_close(m(ids).last_hidden_state, y.double(), torch.float32, name="bert merged")


@pytest.mark.parametrize("share,scope", [("A", "attention"), ("AB", "module_type")])
def test_hf_llama(share, scope):
    m = tiny_llama()
    ids = torch.randint(0, 100, (2, 6))
    apply_adapters(m, ["q_proj", "k_proj", "v_proj", "o_proj"], r=4, share=share, share_scope=scope)
    randomize_b(m)
    out = m(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    with torch.no_grad():
        logits = m(ids).logits
        merge_adapters(m)
        assert_close(m(ids).logits, logits.double(), torch.float32, name="llama merged")


def test_llama_gqa_shareb_attention_is_refused():
    m = tiny_llama()
    with pytest.raises(ValueError, match="cannot share lora_B"):
        apply_adapters(m, ["q_proj", "k_proj", "v_proj"], r=4, share="B", share_scope="attention")
