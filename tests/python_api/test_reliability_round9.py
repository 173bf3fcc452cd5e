"""Careful-misuse probes, round 9: each test reproduces a silent or unclear failure found by probing the public API
and fails on the code before its fix.

Wrong results with no error: a merged layer's ``state_dict`` applied ΔW twice when reloaded; a Linear registered
under two names was adapted at one place only; labels differing by surrounding whitespace became extra classes.
State corrupted: un-merging after a dtype cast left mixed dtypes. Late or unclear errors: ``shaplora_workflow``
argument checks after training, a d×1 weight in ``layer_alphas``, a saved classifier with another head size.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import python_api as lk
from python_api.app import byo_data
from python_api.app.byo_data import BadInput
from python_api.surgery import layer_index
from tests.python_api.toy_models import randomize_b, toy

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    layer = lk.LoRALinear.from_linear(nn.Linear(6, 5), r=3, alpha=6, **kw)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


# ---- merged layers: state dict and casts -------------------------------------------------------------------------
def test_merged_layer_state_dict_holds_the_unmerged_form():
    """The dict of a merged layer reloads into a fresh (unmerged) layer with the same outputs: W is the original,
    not W + ΔW next to the A and B that add ΔW again."""
    layer, x = _layer(), torch.randn(4, 6)
    ref = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    sd = layer.state_dict()
    assert torch.equal(sd["weight"], w0)
    fresh = lk.LoRALinear(6, 5, r=3, alpha=6)
    fresh.load_state_dict(sd)
    assert not fresh.merged
    torch.testing.assert_close(fresh(x), ref)
    # and a merged layer takes the (unmerged) dict, staying merged with the loaded adapters
    other = _layer(seed=1)
    other.merge()
    other.load_state_dict(sd)
    assert other.merged
    torch.testing.assert_close(other(x), ref)
    other.unmerge()
    assert torch.equal(other.weight, w0)


def test_whole_model_state_dict_round_trip_while_merged():
    torch.manual_seed(0)
    model = lk.apply_adapters(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), ["0", "2"], r=2)
    randomize_b(model)
    x = torch.randn(3, 8)
    ref = model(x)
    for layer in lk.adapter_layers(model).values():
        layer.merge()
    sd = copy.deepcopy(model.state_dict())
    torch.manual_seed(1)
    fresh = lk.apply_adapters(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), ["0", "2"], r=2)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), ref)


@pytest.mark.parametrize("cast", [torch.float16, torch.float64])
def test_unmerge_after_a_cast_follows_the_cast(cast):
    layer, x = _layer(), torch.randn(4, 6)
    layer.merge()
    layer.to(cast)
    layer.unmerge()
    assert layer.weight.dtype == cast and layer.lora_A.dtype == cast
    assert layer(x.to(cast)).dtype == cast


def test_reversible_merge_of_a_bf16_model_keeps_fp32_adapters_bit_exact():
    """A bf16 base keeps fp32 adapters: a merge / unmerge round trip with no cast in between changes nothing."""
    torch.manual_seed(0)
    model = lk.apply_adapters(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(torch.bfloat16),
                              ["0", "2"], r=2)
    randomize_b(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lk.merge_adapters(model, reversible=True)
    lk.unmerge_adapters(model)
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert all(m.lora_A.dtype == torch.float32 for m in lk.adapter_layers(model).values())


def test_unmerge_adapters_after_a_cast_follows_the_cast():
    torch.manual_seed(0)
    model = lk.apply_adapters(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), ["0", "2"], r=2)
    randomize_b(model)
    x = torch.randn(3, 8, dtype=torch.float64)
    lk.merge_adapters(model, reversible=True)
    model.double()
    lk.unmerge_adapters(model)
    layers = lk.adapter_layers(model)
    assert all(m.weight.dtype == torch.float64 for m in layers.values())
    assert model(x).dtype == torch.float64


# ---- surgery -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [["0", "2"], ["2"], ["0"]])
def test_module_registered_under_two_names_is_refused(targets):
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"registered under 2 names \['0', '2'\]"):
        lk.apply_adapters(model, targets, r=2)
    assert model[0] is model[2] and type(model[0]) is nn.Linear
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_aliased_module_may_be_saved_not_replaced():
    """modules_to_save only unfreezes: a module under two names (T5's shared embedding) is fine there."""
    class T5Like(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Embedding(10, 8)
            self.encoder = nn.ModuleDict({"embed_tokens": self.shared, "layers": nn.ModuleList([nn.Linear(8, 8)])})
    model = lk.apply_adapters(T5Like(), ["encoder.layers.0"], r=2, modules_to_save=["shared"])
    assert model.shared.weight.requires_grad and model.encoder["embed_tokens"] is model.shared


def test_merge_adapters_on_a_moe_model_says_why():
    model = toy()
    lk.apply_moe_adapters(model, ["q_proj"], [2, 2, 2], r=2, alpha=4.0)
    with pytest.raises(ValueError, match="MoE-LoRA layers have no merged form"):
        lk.merge_adapters(model)


@pytest.mark.parametrize("bad, err", [("1010", TypeError), (None, TypeError), ([[1, 0, 1]], ValueError)])
def test_rank_mask_of_a_wrong_type_names_mask(bad, err):
    layer = _layer()
    with pytest.raises(err, match="mask"):
        layer.set_rank_mask(bad)
    assert bool(layer.rank_mask.all())


@pytest.mark.parametrize("alpha", [0, -2.0])
def test_layer_alpha_must_be_positive_like_adapter_config(alpha):
    with pytest.raises(ValueError, match="alpha must be > 0"):
        lk.LoRALinear(6, 5, r=2, alpha=alpha)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        lk.AdapterConfig(target_modules=["q"], r=2, alpha=alpha)


# ---- checkpoints -------------------------------------------------------------------------------------------------
def test_empty_checkpoint_path_is_refused(tmp_path):
    model = lk.apply_adapters(nn.Sequential(nn.Linear(8, 8)), ["0"], r=2)
    for bad in ("", "  "):
        with pytest.raises(ValueError, match="path must name a directory"):
            lk.save_adapters(model, bad)
    with pytest.raises(TypeError, match="path must be a str"):
        lk.save_adapters(model, 3)


@pytest.mark.parametrize("edit, match", [("mask", "rank masks must hold 0/1"), ("nan", "NaN/Inf"),
                                         ("int", "integer values for floating")])
def test_checkpoint_with_bad_values_is_refused_and_model_kept(tmp_path, edit, match):
    """A hand-edited tensor file (its size and sha256 fixed in the config, so only the values are wrong)."""
    import hashlib
    import json

    from safetensors.torch import load_file, save_file

    from python_api import checkpoint as ck

    def build():
        torch.manual_seed(0)
        return lk.apply_adapters(nn.Sequential(nn.Linear(8, 8)), ["0"], r=4)
    model = build()
    lk.adapter_layers(model)["0"].set_rank_mask([1, 0, 1, 0])
    path = tmp_path / "ck"
    lk.save_adapters(model, path)
    tensors = load_file(str(path / ck.TENSOR_FILE))
    key = next(k for k in tensors if k.endswith("rank_mask" if edit == "mask" else "lora_A"))
    tensors[key] = {"mask": torch.tensor([0.5, 2.0, -1.0, 1.0]), "nan": torch.full_like(tensors[key], math.nan),
                    "int": tensors[key].to(torch.int32)}[edit]
    save_file(tensors, str(path / ck.TENSOR_FILE))
    blob = (path / ck.TENSOR_FILE).read_bytes()
    cfg = json.loads((path / ck.CONFIG_FILE).read_text())
    cfg["tensor_file"] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    (path / ck.CONFIG_FILE).write_text(json.dumps(cfg))
    target = build()
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ck.CheckpointError, match=match):
        lk.load_adapters(target, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


# ---- allocators --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, err, match", [
    ({"mode": "bogus"}, ValueError, "mode must be"),
    ({"by": "bogus"}, ValueError, "by must be"),
    ({"num_passes": 0}, ValueError, "num_passes must be an int >= 1"),
    ({"num_passes": 1.5}, ValueError, "num_passes must be an int >= 1"),
    ({"loss_fn": "x"}, TypeError, "loss_fn must be a callable"),
    ({"seed": 1.5}, TypeError, "seed must be an int"),
    ({"min_stability": math.nan}, ValueError, "min_stability must be finite"),
    ({"mode": "exact"}, ValueError, "mode='exact' enumerates"),
])
def test_shaplora_workflow_checks_every_argument_before_training(kw, err, match):
    calls = []

    def build():
        return lk.apply_adapters(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), ["0", "2"], r=8,
                                 svd=True)
    args = dict(loss_fn=lambda m, b: m(b[0]).pow(2).mean(1), budget=4)
    args.update(kw)
    with pytest.raises(err, match=match):
        lk.shaplora_workflow(build, lambda m: calls.append(m), [(torch.randn(4, 8),)], lambda m: 0.0, **args)
    assert calls == []   # the super-network was never trained


def test_layer_alphas_flags_a_one_column_weight_by_name():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(16, 16), "gate": nn.Linear(16, 1)})
                                        for _ in range(3))
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        alphas, degenerate = lk.layer_alphas(Net(), return_degenerate=True)
    assert len(alphas) == 3 and all(math.isfinite(a) for a in alphas)
    assert sorted(degenerate) == [f"layers.{i}.gate" for i in range(3)]
    assert any("degenerate" in str(x.message) for x in w)


def test_alpha_hill_threshold_nan_is_refused():
    with pytest.raises(ValueError, match="threshold must be a real number"):
        lk.alpha_hill(torch.rand(16) + 0.1, threshold=math.nan)


def test_tracker_beta_of_a_wrong_type_names_it():
    model = lk.apply_adapters(nn.Sequential(nn.Linear(8, 8)), ["0"], r=2, svd=True)
    with pytest.raises(TypeError, match="beta1 must be a number"):
        lk.SensitivityTracker(model, beta1="0.8")


# ---- bring your own data -----------------------------------------------------------------------------------------
def _csv(tmp_path, rows, name="d.csv"):
    import csv
    p = tmp_path / name
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return str(p)


def test_labels_differing_by_surrounding_whitespace_are_one_class(tmp_path):
    rows = [(f"t{i}", lab) for i, lab in enumerate(["pos", "neg", " pos", "neg ", "\tpos", "neg"])]
    with pytest.warns(UserWarning, match="surrounding whitespace removed"):
        ex, _ = byo_data.load_examples(_csv(tmp_path, rows))
    assert ex.label_names == ["neg", "pos"] and ex.labels == [1, 0, 1, 0, 1, 0]
    # evaluation data with the same variants maps to the same classes
    with pytest.warns(UserWarning, match="surrounding whitespace removed"):
        ev, _ = byo_data.load_examples(_csv(tmp_path, [("a", " neg"), ("b", "pos ")], "e.csv"),
                                       label_names=ex.label_names, arg="--eval-data")
    assert ev.labels == [0, 1]


def test_blank_label_and_case_variants(tmp_path):
    with pytest.raises(BadInput, match="empty label"):
        byo_data.load_examples(_csv(tmp_path, [("a", "pos"), ("b", "  "), ("c", "neg")]))
    with pytest.warns(UserWarning, match="differ only in letter case"):
        ex, _ = byo_data.load_examples(_csv(tmp_path, [("a", "POS"), ("b", "pos"), ("c", "neg")], "c.csv"))
    assert ex.label_names == ["POS", "neg", "pos"]


# ---- bring your own model ----------------------------------------------------------------------------------------
def _save_distilbert(path):
    from transformers import DistilBertConfig, DistilBertModel

    from tests.python_api.app.byo_fixtures import tokenizer
    tok = tokenizer()
    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                           max_position_embeddings=64, pad_token_id=0)
    DistilBertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_every_new_head_module_trains(tmp_path):
    """DistilBERT's classification head is pre_classifier + classifier, both new on a base checkpoint: both train."""
    pytest.importorskip("transformers")
    from python_api.app import byo_model
    src = byo_model.resolve(_save_distilbert(tmp_path / "distil"))
    tok = byo_model.load_tokenizer(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = byo_model.load_model(src, "classify", ["neg", "pos"], 0, tok)
    heads = byo_model.head_modules(base, "classify")
    assert heads == ["classifier", "pre_classifier"]
    model = lk.apply_adapters(base, byo_model.resolve_targets(base, None), r=2, modules_to_save=heads)
    assert model.pre_classifier.weight.requires_grad and model.classifier.weight.requires_grad
    assert not model.distilbert.embeddings.word_embeddings.weight.requires_grad


def test_saved_classifier_with_another_head_size_is_a_clear_error(tmp_path):
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification

    from python_api.app import byo_model
    from tests.python_api.app.byo_fixtures import tokenizer
    tok = tokenizer()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    src = byo_model.resolve(str(tmp_path / "clf"))
    with pytest.raises(BadInput, match="fine-tuned 2-label classifier .* the data has 4 classes"):
        byo_model.load_model(src, "classify", ["a", "b", "c", "d"], 0, byo_model.load_tokenizer(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = byo_model.load_model(src, "classify", ["a", "b"], 0, byo_model.load_tokenizer(src))
    assert model.config.num_labels == 2 and byo_model.head_modules(model, "classify") == ["classifier"]


# ---- round 10: AdaLoRA on merged layers or past its final mask, MoE targets outside blocks, distributed types ------
def _svd_model():
    torch.manual_seed(0)
    model = lk.apply_adapters(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), ["0", "2"], r=4, svd=True)
    with torch.no_grad():
        for m in lk.adapter_layers(model).values():
            m.lora_E.normal_()
    return model


def test_adalora_refuses_to_mask_merged_layers():
    model = _svd_model()
    alloc = lk.AdaLoRAAllocator(model, total_step=4, tinit=0, tfinal=1, budget=4)
    model(torch.randn(3, 8)).sum().backward()
    for m in lk.adapter_layers(model).values():
        m.merge()
    before = {n: m.lora_E.detach().clone() for n, m in lk.adapter_layers(model).items()}
    with pytest.raises(RuntimeError, match="merged layer does not read"):
        alloc.update_and_allocate(3)
    assert all(torch.equal(before[n], m.lora_E) for n, m in lk.adapter_layers(model).items())


def test_adalora_past_its_final_mask_without_one_is_an_error():
    """A fresh allocator handed steps after its final mask step (a resumed run without its state) would leave
    every rank in: refused."""
    alloc = lk.AdaLoRAAllocator(_svd_model(), total_step=6, tinit=0, tfinal=2, budget=4)
    with pytest.raises(RuntimeError, match="past the final mask step 4 with no final mask"):
        alloc.update_and_allocate(5)


def test_moe_target_outside_the_blocks_is_named_in_a_warning():
    model = toy()
    head = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and layer_index(n) is None)
    with pytest.warns(UserWarning, match=f"also matches \\['{head}'\\] outside the numbered blocks"):
        lk.apply_moe_adapters(model, ["q_proj", head], [2, 2, 2], r=2, alpha=4.0)
    assert type(model.get_submodule(head)) is nn.Linear


def test_distributed_helpers_name_a_wrong_type():
    from python_api import distributed as D
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        D.shared_parameters(object())
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        D.sync_shared_grads("x")
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        D.all_reduce_sum(torch.ones(2), group=object())
    with pytest.raises(TypeError, match="t must be a torch.Tensor"):
        D.all_reduce_sum([1.0])
