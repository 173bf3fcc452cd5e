"""PEFT interop: exported adapters load in PEFT with equal outputs; PEFT adapters import with equal outputs."""
from __future__ import annotations

import pytest
import torch

from python_api.peft_interop import export_peft, import_peft
from python_api.surgery import adapter_layers, apply_adapters
from tests.helpers import assert_close
from tests.python_api.toy_models import randomize_b, toy

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _x():
    return torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("kw", [{}, {"svd": True}, {"share": "A"}])
def test_export_loads_in_peft_with_equal_outputs(tmp_path, kw):
    m = apply_adapters(toy(0), TARGETS, r=4, alpha=8, modules_to_save=["classifier"], **kw)
    randomize_b(m)
    layers = adapter_layers(m)
    with torch.no_grad():
        m.classifier.weight.add_(0.5)
        for layer in layers.values():
            if layer.lora_E is not None:
                layer.lora_E.normal_()
    # a rank pattern, one module at rank 0 (left out of PEFT's target_modules)
    layers["layers.0.q_proj"].set_rank_mask([1, 0, 1, 0])
    layers["layers.2.v_proj"].set_rank_mask([0, 0, 0, 0])
    layers["layers.1.k_proj"].set_rank_mask([0, 0, 0, 1])
    export_peft(m, tmp_path)
    pm = peft.PeftModel.from_pretrained(toy(0), str(tmp_path))
    x = _x()
    assert_close(pm(x), m(x).double(), torch.float32, name="peft vs lora-kernels")
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert "layers.2.v_proj" not in cfg.target_modules


def test_import_peft_adapter_equal_outputs_and_checks(tmp_path):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"layers.1.v_proj": 2},
                     modules_to_save=["classifier"], init_lora_weights=False)
    torch.manual_seed(0)
    pm = get_peft_model(toy(0), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save.default" in n:
                p.add_(0.3)
    pm.save_pretrained(str(tmp_path))
    ours = import_peft(toy(0), tmp_path)
    x = _x()
    assert_close(ours(x), pm(x).double(), torch.float32, name="imported vs peft")
    assert adapter_layers(ours)["layers.1.v_proj"].r == 2
    with pytest.raises(ValueError, match="does not fit this model"):
        import_peft(toy(0, d=24), tmp_path)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        import_peft(toy(0), tmp_path / "nope")


def test_export_refuses_moe(tmp_path):
    from python_api.moe import apply_moe_adapters
    m = toy(0)
    apply_moe_adapters(m, ["q_proj"], [2, 2, 2], r=2, alpha=4)
    with pytest.raises(ValueError, match="no PEFT LoRA equivalent"):
        export_peft(m, tmp_path)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq"])
def test_import_refuses_inits_that_change_the_base_weight(tmp_path, init):
    """PiSSA / OLoRA / CorDA / LoftQ adapters hold B·A of a residual base (W − sBA) that PEFT rebuilds on load;
    added to the unmodified W they would count the principal part twice: refused, the model untouched."""
    import json

    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(toy(0), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = init
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    model = toy(0)
    with pytest.raises(ValueError, match="changes the base weight"):
        import_peft(model, tmp_path)
    assert not adapter_layers(model)


def test_import_refuses_trained_biases(tmp_path):
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(toy(0), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], bias="all"))
    pm.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="bias='all'"):
        import_peft(toy(0), tmp_path)


def test_export_refuses_trained_parameters_it_cannot_carry(tmp_path):
    """A bias tuned beside the adapters (its module's weight frozen) has no place in a PEFT LoRA adapter."""
    m = apply_adapters(toy(0), TARGETS, r=2, alpha=4, modules_to_save=["classifier"])
    norm = next(n for n, p in m.named_parameters() if n.endswith("bias") and "classifier" not in n
                and "lora" not in n)
    m.get_parameter(norm).requires_grad_(True)
    with pytest.raises(ValueError, match="cannot be exported to a PEFT LoRA adapter") as e:
        export_peft(m, tmp_path / "x")
    assert norm in str(e.value)
    m.get_parameter(norm).requires_grad_(False)
    export_peft(m, tmp_path / "y")   # the classifier (a whole trainable module) is modules_to_save
