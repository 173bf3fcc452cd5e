"""The library under careful misuse (round 12): the AdaLoRA Trainer callback with ``load_best_model_at_end``, an
evaluation under ``torch.inference_mode`` before training, loading or adapting a merged model, a half-loaded
``load_adapter_state_dict``, a NaN in a ShapLoRA super-network, per-block dicts read back from JSON, allocator
hyper-parameters replaced by a loaded state."""
from __future__ import annotations


import warnings

import pytest
import torch
from torch import nn

import python_api as lk


# ---- 1. AdaLoRA + Trainer(load_best_model_at_end=True) keeps the budget ----------------------------------------
def test_adalora_callback_keeps_the_budget_when_the_best_checkpoint_is_early(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from .allocators.test_callbacks import _model, _Toy
    model = _model()
    al = lk.AdaLoRAAllocator(model, total_step=8, tinit=1, tfinal=2, deltaT=1, budget=6)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=8, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
        logging_strategy="no", disable_tqdm=True, load_best_model_at_end=True, metric_for_best_model="eval_loss",
        greater_is_better=False)

    class EarlyIsBest(transformers.TrainerCallback):   # the best evaluation came at step 2, before the final mask
        def on_evaluate(self, a, state, control, metrics=None, **kw):
            metrics["eval_loss"] = float(state.global_step)
    tr = transformers.Trainer(model=model, args=args, train_dataset=_Toy(), eval_dataset=_Toy(8, seed=1),
                              callbacks=[lk.adalora_callback(al), EarlyIsBest()])
    with pytest.warns(UserWarning, match="predates the final AdaLoRA mask"):
        tr.train()
    assert tr.state.best_model_checkpoint.endswith("checkpoint-2")
    kept = sum(int((m.lora_E != 0).sum()) for m in lk.adapter_layers(model).values())
    assert sum(map(sum, al.rank_pattern.values())) == 6 and kept <= 6


# ---- 2. an evaluation under torch.inference_mode does not stop later training ---------------------------------
def test_training_after_an_inference_mode_evaluation():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    lk.apply_adapters(m, ["0", "2"], r=4, rank_masks={"0": [1, 1, 0, 1]})
    x = torch.randn(4, 8)
    m.eval()
    with torch.inference_mode():
        y = m(x)
    m.train()
    m(x).pow(2).mean().backward()                               # the cached active ranks are not inference tensors
    assert m[0].lora_A.grad is not None and m[0].lora_A.grad[2].abs().max() == 0
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), y)


# ---- 3. a merged model: loading or adapting it again ----------------------------------------------------------
def _adapted_mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    lk.apply_adapters(m, ["0", "2"], r=2)
    with torch.no_grad():
        for layer in lk.adapter_layers(m).values():
            layer.lora_B.normal_()
    return m


def test_loading_into_a_merged_model_is_refused(tmp_path):
    m = _adapted_mlp()
    x = torch.randn(3, 8)
    y = m(x).detach()
    lk.save_adapters(m, str(tmp_path / "ck"))
    lk.merge_adapters(m)
    with pytest.raises(lk.CheckpointError, match="adapters merged in .*apply a ΔW twice"):
        lk.load_adapters(m, str(tmp_path / "ck"))
    torch.testing.assert_close(m(x), y)                           # untouched: still the merged model
    r = _adapted_mlp()
    lk.merge_adapters(r, reversible=True)
    with pytest.raises(lk.CheckpointError, match="merged reversibly"):
        lk.load_adapters(r, str(tmp_path / "ck"))
    with pytest.raises(ValueError, match="merged reversibly.*unmerge_adapters\\(model\\) first"):
        lk.apply_adapters(r, ["0"], r=2)
    lk.unmerge_adapters(r)
    torch.testing.assert_close(r(x), y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_base_check_tells_a_cast_from_other_weights(tmp_path, dtype):
    def mlp(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    m = lk.apply_adapters(mlp(0), ["0", "2"], r=4)
    with torch.no_grad():   # a realistic update: ‖ΔW‖ = 2% of ‖W‖
        for layer in lk.adapter_layers(m).values():
            layer.lora_B.normal_()
            layer.lora_B.mul_(0.02 * layer.weight.norm() / layer.delta_weight().norm())
    lk.save_adapters(m, str(tmp_path / "ck"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # the same base, cast: no warning
        lk.load_adapters(mlp(0).to(dtype), str(tmp_path / "ck"))
    with pytest.warns(UserWarning, match="differs from the one the adapters were trained on"):
        lk.load_adapters(mlp(1).to(dtype), str(tmp_path / "ck"))
    noisy = mlp(0)
    with torch.no_grad():
        noisy[0].weight.add_(0.02 * noisy[0].weight.norm() / 256 * torch.randn(256, 256))
    with pytest.warns(UserWarning, match="base weight of '0' differs"):
        lk.load_adapters(noisy.to(dtype), str(tmp_path / "ck"))
    lk.merge_adapters(m)
    m.to(dtype)
    with pytest.raises(lk.CheckpointError, match="adapters merged in"):   # ΔW would be applied twice
        lk.load_adapters(m, str(tmp_path / "ck"))


# ---- 4. load_adapter_state_dict is all or nothing and refuses NaN ---------------------------------------------
@pytest.mark.parametrize("spoil", ["shape", "nan", "extra"])
def test_load_adapter_state_dict_all_or_nothing(spoil):
    from python_api.surgery import adapter_state_dict, load_adapter_state_dict
    src = _adapted_mlp()
    sd = {k: v.clone() for k, v in adapter_state_dict(src).items()}
    if spoil == "shape":
        sd["2.lora_B"] = torch.ones(4, 1)
    elif spoil == "nan":
        sd["2.lora_B"][0, 0] = float("nan")
    else:
        sd["9.lora_A"] = torch.ones(2, 8)
    dst = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    lk.apply_adapters(dst, ["0", "2"], r=2)
    before = {k: v.clone() for k, v in adapter_state_dict(dst).items()}
    with pytest.raises((ValueError, KeyError), match={"shape": "checkpoint shape", "nan": "non-finite",
                                                      "extra": "unexpected keys"}[spoil]):
        load_adapter_state_dict(dst, sd)
    after = adapter_state_dict(dst)
    assert all(torch.equal(after[k], before[k]) for k in before)   # not one tensor written


# ---- 5. a NaN in a ShapLoRA super-network ---------------------------------------------------------------------
def _nan_supernet():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    lk.apply_adapters(m, ["0", "2"], r=4, svd=True)
    with torch.no_grad():
        for layer in lk.adapter_layers(m).values():
            layer.lora_E.fill_(1.0)
            layer.lora_B.normal_()
        lk.adapter_layers(m)["2"].lora_E[1] = float("nan")      # one diverged singular value, in the last module
    return m


def test_a_nan_supernet_is_refused_by_name_and_left_as_it_was():
    from python_api.allocators.shaplora import to_merged_basis
    m = _nan_supernet()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="module '2': its adapter update holds non-finite values"):
        to_merged_basis(m)
    assert torch.equal(m[0].lora_A, before["0.lora_A"])          # the first module was not rewritten
    val = [(torch.randn(4, 8), torch.randn(4, 4))]
    with pytest.raises(ValueError, match="module '2'"):
        lk.shaplora_allocate(m, val, 3, loss_fn=lambda mod, b: (mod(b[0]) - b[1]).pow(2).mean(-1))
    assert torch.equal(m[0].lora_A, before["0.lora_A"])


# ---- 6. per-block dicts read back from JSON; allocator constants not replaced by a loaded state -----------------
def test_moe_per_block_dicts_from_json():
    import json

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.v = nn.Linear(16, 16), nn.Linear(16, 16)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block() for _ in range(3)])
    experts = json.loads(json.dumps({0: 2, 1: 3, 2: 2}))          # {"0": 2, ...}
    top_k = json.loads(json.dumps({0: 1, 1: 2, 2: 1}))
    m = Net()
    lk.apply_moe_adapters(m, ["q", "v"], experts, r=2, alpha=4, top_k=top_k)
    assert [m.layers[i].q.num_experts for i in range(3)] == [2, 3, 2]
    with pytest.raises(ValueError, match="block 1 is given twice"):
        lk.apply_moe_adapters(Net(), ["q", "v"], {1: 2, "1": 3, 0: 1, 2: 1}, r=2, alpha=4)
    with pytest.raises(TypeError, match="experts_per_layer: a dict maps block indices"):
        lk.apply_moe_adapters(Net(), ["q", "v"], {"first": 2}, r=2, alpha=4)


def test_loaded_allocator_state_does_not_replace_its_betas(tmp_path):
    def model():
        torch.manual_seed(0)
        return lk.apply_adapters(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), ["0", "2"], r=4,
                                 svd=True)
    m = model()
    al = lk.AdaLoRAAllocator(m, target_r=2, total_step=10)
    m(torch.randn(4, 8)).pow(2).mean().backward()
    al.update_and_allocate(0)
    lk.save_adapters(m, str(tmp_path / "ck"), allocator=al, step=1)
    m2 = model()
    al2 = lk.AdaLoRAAllocator(m2, target_r=2, total_step=10, beta1=0.5, beta2=0.5)
    with pytest.raises(lk.CheckpointError, match="saved with beta1=0.85, beta2=0.85.*beta1=0.5"):
        lk.load_adapters(m2, str(tmp_path / "ck"), allocator=al2)
    assert (al2.tracker.beta1, al2.tracker.beta2) == (0.5, 0.5) and al2.tracker.step == 0


# ---- 7. the bundled alloc and bench: options that would be ignored -------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["alloc", "--method", "alphalora", "--steps", "5"], "--steps"),
    (["alloc", "--method", "alphalora", "--r", "100", "--r-init", "4"], "--r"),
    (["alloc", "--method", "alphalora", "--batch-size", "7"], "--batch-size"),
    (["alloc", "--method", "shaplora", "--beta", "3"], "--beta"),
    (["alloc", "--method", "adalora", "--min-experts", "1"], "--min-experts"),
    (["alloc", "--method", "shaplora", "--budget", "10"], "--budget"),               # own-model alloc only
    (["alloc", "--method", "alphalora", "--model", "m", "--data", "d", "--steps", "5"], "--steps"),
    (["alloc", "--method", "shaplora", "--model", "m", "--data", "d", "--experts-per-layer", "3"],
     "--experts-per-layer"),                                                           # bundled alloc only
    (["bench", "--only", ","], "--only")])
def test_alloc_and_bench_refuse_what_they_would_ignore(argv, flag, capsys, tmp_path):
    from python_api.app import cli
    rc = cli.main([*argv, *(["--out", str(tmp_path / "o")])])
    err = capsys.readouterr().err
    if argv[0] == "bench":
        assert rc == 1 and "--only: no benchmark module named" in err
    else:
        assert rc == 2 and f"error: {flag}: used only by " in err   # bad input: exit 2, as for train
    assert not (tmp_path / "o").exists()
