"""The library under careful misuse (round 11): a refused ``load_adapters`` on a larger model, module names that
are suffixes of others ("fc" beside "z.fc") in patterns and PEFT round trips, a dict of layer alphas, a float
permutation count, a wrong input shape on ShareLoRA's reuse path."""
from __future__ import annotations

import pytest
import torch


# ---- 1. a refused load_adapters leaves the whole model as it was ---------------------------------------------
@pytest.mark.parametrize("share", [None, "A"])
def test_refused_load_into_a_larger_model_leaves_it_untouched(tmp_path, share):
    import python_api as lk
    from transformers import BertConfig, BertModel

    def bert(layers):
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                    intermediate_size=64))
    kw = {"share": share} if share else {}
    lk.save_adapters(lk.apply_adapters(bert(2), ["query", "value"], r=4, **kw), str(tmp_path / "ck"))
    big = bert(3)
    before = dict(big.named_modules())
    grads = {n: p.requires_grad for n, p in big.named_parameters()}
    with pytest.raises(lk.CheckpointError):
        lk.load_adapters(big, str(tmp_path / "ck"))   # its third block has query / value too
    assert dict(big.named_modules()) == before        # the same module objects, nothing adapted
    assert {n: p.requires_grad for n, p in big.named_parameters()} == grads
    lk.apply_adapters(big, ["query", "value"], r=4, **kw)   # a corrected retry is not refused


# ---- 2. a module name that is the suffix of another's ("fc" and "z.fc") -------------------------------------
class _Nested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.z = torch.nn.Module()
        self.z.fc = torch.nn.Linear(8, 8)
        self.y = torch.nn.Module()
        self.y.fc = torch.nn.Linear(8, 8)   # never adapted: must stay a plain Linear in PEFT too

    def forward(self, x):
        return self.y.fc(self.z.fc(self.fc(x)))


def test_rank_pattern_takes_the_most_specific_key():
    import python_api as lk
    for pattern in ({"fc": 2, "z.fc": 4}, {"z.fc": 4, "fc": 2}):   # whatever the keys' order
        m = lk.apply_adapters(_Nested(), r"fc|z\.fc", r=4, rank_pattern=pattern)   # a regex: y.fc is left out
        assert {n: layer.r for n, layer in lk.adapter_layers(m).items()} == {"fc": 2, "z.fc": 4}


def test_peft_round_trip_with_suffix_names(tmp_path):
    import python_api as lk
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    m = lk.apply_adapters(_Nested(), r"fc|z\.fc", r=4, alpha=8)
    for layer in lk.adapter_layers(m).values():
        torch.nn.init.normal_(layer.lora_B)
    lk.adapter_layers(m)["fc"].set_rank_mask([1, 1, 0, 0])   # fc exports at rank 2, z.fc at 4
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = m(x)
    lk.export_peft(m, str(tmp_path / "p"))
    torch.manual_seed(0)
    pm = peft.PeftModel.from_pretrained(_Nested(), str(tmp_path / "p"))
    assert type(pm.base_model.model.y.fc) is torch.nn.Linear     # the unadapted "*.fc" is left alone
    with torch.no_grad():
        torch.testing.assert_close(pm(x), y)
    torch.manual_seed(0)
    back = lk.import_peft(_Nested(), str(tmp_path / "p"))
    assert {n: layer.r for n, layer in lk.adapter_layers(back).items()} == {"fc": 2, "z.fc": 4}
    with torch.no_grad():
        torch.testing.assert_close(back(x), y)


# ---- 3. library arguments: a dict of alphas, a float permutation count, a wrong input on the reuse path --------
def test_allocate_experts_refuses_a_dict_or_set():
    from python_api.allocators.alphalora import allocate_experts
    assert allocate_experts([5.0, 2.0], 6) == [5, 1]
    for alphas in ({1: 5.0, 2: 2.0}, {0: 5.0, 1: 2.0}, {5.0, 2.0}):
        with pytest.raises(TypeError, match="alphas must be a sequence of floats in layer order"):
            allocate_experts(alphas, 6)


@pytest.mark.parametrize("n", [2.5, True, "4"])
def test_num_permutations_must_be_an_int(n):
    from python_api.allocators.shaplora import permutation_shapley
    with pytest.raises(ValueError, match="num_permutations must be an int >= 1"):
        permutation_shapley(lambda mask: 0.0, 3, n)


def test_shared_reuse_path_names_x_on_a_wrong_shape():
    import python_api as lk
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    m = lk.apply_adapters(BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64)),
                          ["query", "key", "value"], r=4, share="A", share_scope="attention")
    q = m.encoder.layer[0].attention.self.query
    assert q._reuse_ok(torch.randn(4, 32), None)               # the path this checks
    for x in (torch.randn(4, 16), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 32\]"):
            q(x)
    assert q(torch.randn(2, 3, 32)).shape == (2, 3, 32)


def test_to_peft_lora_config_with_suffix_names():
    import python_api as lk
    peft = pytest.importorskip("peft")
    masks = {"fc": torch.tensor([1, 1, 0, 0], dtype=torch.bool), "z.fc": torch.tensor([1, 1, 1, 1], dtype=torch.bool)}
    pm = peft.get_peft_model(_Nested(), lk.to_peft_lora_config(masks, lora_alpha=4))
    net = pm.base_model.model
    assert net.fc.lora_A["default"].weight.shape[0] == 2 and net.z.fc.lora_A["default"].weight.shape[0] == 4
    assert type(net.y.fc) is torch.nn.Linear
