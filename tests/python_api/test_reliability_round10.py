"""Careful misuse of the library (round 10): ShareLoRA's shrink-reuse path with an unfrozen base weight, MoE
expert counts for blocks no target reaches, and encoder-decoder models whose two block stacks share indices."""
from __future__ import annotations

import pytest
import torch

import python_api as lk
from python_api.surgery import block_stack

transformers = pytest.importorskip("transformers")


def _bert(layers: int = 2):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=64, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)


def _bart():
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64)
    return transformers.BartModel(cfg)


@pytest.mark.parametrize("reuse", [True, False])
def test_shared_a_refuses_an_unfrozen_base_weight_on_every_path(reuse):
    m = lk.apply_adapters(_bert(), ["query", "key", "value"], r=4, alpha=8, share="A", share_scope="attention",
                          reuse_shrink=reuse)
    m.requires_grad_(True)   # base weights trainable again: the op would give them no gradient
    m.train()
    ids = torch.randint(0, 100, (2, 8))
    with pytest.raises(ValueError, match="weight requires grad"):
        m(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()


def test_shared_a_reuse_path_still_runs_with_a_frozen_base():
    m = lk.apply_adapters(_bert(), ["query", "key", "value"], r=4, alpha=8, share="A", share_scope="attention")
    m(input_ids=torch.randint(0, 100, (2, 8)), labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is None for n, p in m.named_parameters() if n.endswith("query.weight"))


@pytest.mark.parametrize("experts", [{0: 2, 1: 2, 3: 5}, [2, 2, 0, 5], {0: 2, 2: 1, 1: 2}])
def test_experts_for_blocks_no_target_reaches_are_refused(experts):
    model = _bert()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="blocks no target reaches"):
        lk.apply_moe_adapters(model, ["query"], experts, r=2, alpha=4)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())   # nothing changed
    assert not any(isinstance(m, lk.MoELoRALinear) for m in model.modules())


def test_experts_for_a_block_between_targeted_ones_are_refused():
    # targets in blocks 0 and 2 only (a regex): an expert count for block 1 would be dropped
    model = _bert(layers=3)
    with pytest.raises(ValueError, match=r"\{1: 3\}"):
        lk.apply_moe_adapters(model, r".*layer\.(0|2)\.attention\.self\.query", [2, 3, 2], r=2, alpha=4)
    out = lk.apply_moe_adapters(_bert(layers=3), r".*layer\.(0|2)\.attention\.self\.query", [2, 0, 2], r=2, alpha=4)
    assert sorted(m.num_experts for m in out.values()) == [2, 2]


def test_zero_experts_for_unreached_blocks_are_accepted():
    out = lk.apply_moe_adapters(_bert(), ["query"], {0: 2, 1: 3, 5: 0}, r=2, alpha=4)
    assert sorted(m.num_experts for m in out.values()) == [2, 3]


def test_block_stack_names_the_numbered_list():
    assert block_stack("model.decoder.layers.3.fc1") == "model.decoder.layers"
    assert block_stack("bert.encoder.layer.0.attention.self.query") == "bert.encoder.layer"
    assert block_stack("layers.2.mlp") == "layers"
    assert block_stack("classifier") is None


def test_encoder_decoder_stacks_are_not_merged_by_block_index():
    bart = _bart()
    with pytest.raises(ValueError, match=r"2 stacks of numbered blocks \['decoder.layers', 'encoder.layers'\]"):
        lk.layer_alphas(bart, ["q_proj"])
    with pytest.raises(ValueError, match="stacks of numbered blocks"):
        lk.apply_moe_adapters(bart, ["q_proj"], [2, 2], r=2, alpha=4)
    assert not any(isinstance(m, lk.MoELoRALinear) for m in bart.modules())
    # one stack, named by the regex the error suggests: 2 blocks, 2 alphas, experts follow
    one = r"encoder\.layers\..*q_proj"
    alphas = lk.layer_alphas(bart, one)
    assert len(alphas) == 2
    out = lk.apply_moe_adapters(bart, one, lk.allocate_experts(alphas, total=4), r=2, alpha=4)
    assert sorted(out) == ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.q_proj"]
    assert sum(m.num_experts for m in out.values()) == 4



@pytest.mark.parametrize("method", ["moe-uniform", "alphalora"])
def test_cli_moe_targets_in_two_stacks_are_bad_input_naming_targets(method):
    # the CLI's model check, before anything is written (BART itself has no classify head the CLI can train,
    # and its causal-LM form is the decoder alone: the check is for any such model)
    from python_api.app import train as T
    from python_api.app.byo_data import BadInput
    from python_api.app.byo_model import block_linears

    bart = _bart()
    cfg = T.TrainConfig(model="m", data="d", method=method, out="o").defaults_for("classify")
    with pytest.raises(BadInput, match=r"--targets: .*\['decoder.layers', 'encoder.layers'\]"):
        T._check_model_fit(cfg, bart, block_linears(bart), False)
    enc = [n for n in block_linears(bart) if n.startswith("encoder.")]
    T._check_model_fit(cfg, bart, enc, False)   # one stack: accepted
