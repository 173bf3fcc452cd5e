"""ShareLoRA: sharing by reference, in-place gradient accumulation, shrink reuse, checkpoints, training parity."""
from __future__ import annotations

import copy

import pytest
import torch

from python_api import apply_adapters, count_trainable, merge_adapters
from python_api.share import SharedLoRALinear
from python_api.surgery import adapter_layers, adapter_state_dict, load_adapter_state_dict
from tests.helpers import assert_close, randn
from tests.python_api.toy_models import assert_shared_grads_are_sums, randomize_b, tie_like, tiny_bert, toy

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
CASES = [("A", "module_type"), ("B", "module_type"), ("AB", "module_type"), ("A", "attention"),
         ("AB", "attention")]


def shared_model(share, scope, dtype=torch.float32, **kw):
    m = apply_adapters(toy(dtype=dtype), QKVO, r=4, share=share, share_scope=scope, **kw)
    randomize_b(m)
    return m


def test_sharing_is_by_reference_and_seen_once_by_optimizer():
    m = shared_model("AB", "attention")
    L = adapter_layers(m)
    a = L["layers.0.q_proj"].lora_A
    assert all(L[f"layers.{i}.{p}"].lora_A is a for i in range(3) for p in ("q_proj", "k_proj", "v_proj"))
    assert L["layers.0.o_proj"].lora_A is not a and L["layers.2.o_proj"].lora_A is L["layers.0.o_proj"].lora_A
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
    assert len(opt.param_groups[0]["params"]) == 4       # A_qkv, B_qkv, A_o, B_o
    assert count_trainable(m) == 4 * 16 + 16 * 4 + 4 * 16 + 16 * 4


@pytest.mark.parametrize("move", ["double", "to_dtype_device", "deepcopy", "swap_tensors"])
def test_moving_the_model_keeps_sharing(move, monkeypatch):
    m = shared_model("AB", "module_type")
    if move == "double":
        m = m.double()
    elif move == "to_dtype_device":
        m = m.to(device="cpu", dtype=torch.bfloat16)
    elif move == "deepcopy":
        m = copy.deepcopy(m)
    else:
        monkeypatch.setattr(torch.__future__, "get_swap_module_params_on_conversion", lambda: True)
        m = m.to(torch.float64)
    L = adapter_layers(m)
    assert L["layers.0.q_proj"].lora_A is L["layers.2.q_proj"].lora_A
    assert L["layers.0.q_proj"].lora_B is L["layers.1.q_proj"].lora_B
    assert count_trainable(m) == 4 * (4 * 16 + 16 * 4)
    m(randn(2, 3, 16, dtype=L["layers.0.q_proj"].weight.dtype)).sum().backward()
    assert L["layers.0.q_proj"].lora_A.grad is L["layers.1.q_proj"].lora_A.grad


@pytest.mark.parametrize("accumulate", ["inplace", "autograd"])
@pytest.mark.parametrize("share,scope", CASES)
def test_shared_gradient_is_sum_of_layer_gradients(share, scope, accumulate):
    # fp64 everywhere: the tied unshared model's per-layer gradients, summed, are the oracle.
    s = shared_model(share, scope, torch.float64, accumulate=accumulate)
    u = apply_adapters(toy(dtype=torch.float64), QKVO, r=4)
    tie_like(u, s)
    x = randn(2, 5, 16, dtype=torch.float64)
    s(x).square().sum().backward()
    u(x).square().sum().backward()
    assert_shared_grads_are_sums(s, u)


def test_inplace_accumulates_into_one_fp32_buffer_across_micro_batches():
    m = shared_model("A", "module_type")
    a = m.layers[0].q_proj.lora_A
    ref = copy.deepcopy(m)
    for mod in adapter_layers(ref).values():
        mod.accumulate = "autograd"
    x1, x2 = randn(2, 5, 16), randn(3, 5, 16)
    m(x1).sum().backward()
    buf = a.grad
    assert buf.dtype == torch.float32 and buf.data_ptr() == a.grad.data_ptr()
    m(x2).sum().backward()
    assert a.grad is buf                                  # accumulated in place, never replaced
    ref(x1).sum().backward()
    ref(x2).sum().backward()
    ra = ref.layers[0].q_proj.lora_A
    assert_close(a.grad, ra.grad.double(), name="two micro-batches")
    # set_to_none: the next forward makes a fresh buffer; no double counting of the old one
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.0)
    opt.zero_grad(set_to_none=True)
    assert a.grad is None
    m(x1).sum().backward()
    ref.zero_grad(set_to_none=True)
    ref(x1).sum().backward()
    assert_close(a.grad, ra.grad.double(), name="after zero_grad(set_to_none)")


def test_no_grad_and_frozen_forward_make_no_buffer():
    m = shared_model("A", "module_type")
    with torch.no_grad():
        m(randn(1, 3, 16))
    assert m.layers[0].q_proj.lora_A.grad is None
    m.layers[0].q_proj.lora_A.requires_grad_(False)
    m(randn(1, 3, 16)).sum().backward()
    assert m.layers[0].q_proj.lora_A.grad is None


def test_second_use_of_shared_matrix():
    # A regulariser on A: autograd adds its gradient into the shared buffer in place -> same as autograd mode.
    x = randn(2, 3, 16)
    grads = []
    for accumulate in ("inplace", "autograd"):
        m = shared_model("A", "module_type", accumulate=accumulate)
        a = m.layers[0].q_proj.lora_A
        (m(x).sum() + (a @ a.t()).square().sum()).backward()
        grads.append(a.grad)
    assert_close(grads[0], grads[1].double(), name="regularised shared A")
    # When autograd would *replace* the buffer (create_graph=True accumulates out of place), the layers'
    # in-place contributions would be lost: the guard refuses.
    m = shared_model("A", "module_type")
    a = m.layers[0].q_proj.lora_A
    loss = m(x).sum() + (a @ a.t()).square().sum()
    with pytest.raises(RuntimeError, match="accumulate='autograd'"), pytest.warns(UserWarning):
        loss.backward(create_graph=True)
    a.grad = None   # break the create_graph reference cycle


def test_bf16_base_with_fp32_shared_a():
    s = shared_model("A", "attention", torch.bfloat16)
    a = s.layers[0].q_proj.lora_A
    assert a.dtype == torch.float32 and s.layers[0].q_proj.weight.dtype == torch.bfloat16
    u = apply_adapters(toy(dtype=torch.float64), QKVO, r=4)
    tie_like(u, s)
    x = randn(2, 5, 16)
    s(x.bfloat16()).float().square().sum().backward()
    u(x.double()).square().sum().backward()
    assert a.grad.dtype == torch.float32
    want = sum(lay.lora_A.grad for n, lay in adapter_layers(u).items() if "o_proj" not in n)
    assert_close(a.grad, want, torch.bfloat16, name="bf16 shared A grad")


def test_half_precision_shared_matrix_falls_back_to_autograd():
    m = shared_model("A", "module_type").to(torch.bfloat16)      # adapters cast too: no fp32 buffer possible
    a = m.layers[0].q_proj.lora_A
    m(randn(2, 3, 16, dtype=torch.bfloat16)).sum().backward()
    assert a.grad is not None and a.grad.dtype == torch.bfloat16


def test_shrink_is_computed_once_for_qkv_and_matches_unsplit_path():
    s = shared_model("A", "attention", torch.float64)
    ref = copy.deepcopy(s)
    for mod in adapter_layers(ref).values():
        mod.reuse_shrink = False
    grp = s.layers[0].q_proj.share_a
    x = randn(2, 5, 16, dtype=torch.float64)
    y = s(x)
    assert grp.hits == 2 * 3                        # k and v reuse q's H in each of the 3 blocks
    y.square().sum().backward()
    ref(x).square().sum().backward()
    assert_close(y, ref(x).detach(), name="y")
    for (n, p), (_, q) in zip(s.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            assert_close(p.grad, q.grad, name=n)
    # module-type scope: q's A is not shared with a sibling on the same input, nothing to reuse
    m = shared_model("A", "module_type")
    m(x.float())
    assert m.layers[0].q_proj.share_a.hits == 0


def test_shrink_reuse_under_activation_checkpointing():
    from torch.utils.checkpoint import checkpoint
    s = shared_model("A", "attention", torch.float64)
    ref = copy.deepcopy(s)
    x = randn(2, 5, 16, dtype=torch.float64)

    def run(model, ckpt):
        h = x
        for blk in model.layers:
            h = checkpoint(blk, h, use_reentrant=False) if ckpt else blk(h)
        return model.classifier(h.mean(1)).square().sum()
    run(s, True).backward()
    run(ref, False).backward()
    for (n, p), (_, q) in zip(s.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            assert_close(p.grad, q.grad, name=n)


def test_reuse_is_off_with_dropout_or_gates():
    s = shared_model("A", "attention", dropout=0.1)
    s(randn(2, 5, 16))
    assert s.layers[0].q_proj.share_a.hits == 0
    s.eval()
    with torch.no_grad():
        s(randn(2, 5, 16))
    assert s.layers[0].q_proj.share_a.hits == 6


def test_deterministic_bit_identical_runs():
    grads = []
    for _ in range(2):
        m = shared_model("AB", "attention")
        m(randn(4, 7, 16, generator=torch.Generator().manual_seed(3))).square().sum().backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("share,scope", [("A", "module_type"), ("AB", "attention")])
def test_training_loss_matches_reference_path_step_by_step(share, scope):
    # Reference path: the same shared model with autograd's default accumulation (per-layer gradients,
    # summed by autograd) and no shrink reuse; same data, same AdamW.
    fast = shared_model(share, scope, modules_to_save=["classifier"])
    ref = copy.deepcopy(fast)
    for mod in adapter_layers(ref).values():
        mod.accumulate, mod.reuse_shrink = "autograd", False
    opts = [torch.optim.AdamW([p for p in mm.parameters() if p.requires_grad], lr=1e-2) for mm in (fast, ref)]
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        x = randn(4, 6, 16, generator=g)
        target = torch.randint(0, 3, (4,), generator=g)
        losses = []
        for mm, opt in zip((fast, ref), opts):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(mm(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert_close(losses[0], losses[1].double(), name=f"loss at step {step}")


@pytest.mark.parametrize("share,scope", CASES)
def test_checkpoint_stores_shared_matrix_once_and_restores_sharing(share, scope, tmp_path):
    from safetensors.torch import load_file, save_file
    m = shared_model(share, scope, modules_to_save=["classifier"])
    sd = adapter_state_dict(m)
    n_unique = len({id(p) for lay in adapter_layers(m).values() for p in (lay.lora_A, lay.lora_B)})
    assert sum(k.endswith(("lora_A", "lora_B")) for k in sd) == n_unique
    assert sum(v.numel() for k, v in sd.items() if k.endswith(("lora_A", "lora_B", "weight", "bias"))) \
        == count_trainable(m)
    save_file(sd, str(tmp_path / "a.safetensors"))        # raises on shared memory: stored once
    fresh = apply_adapters(toy(), QKVO, r=4, share=share, share_scope=scope, modules_to_save=["classifier"])
    load_adapter_state_dict(fresh, load_file(str(tmp_path / "a.safetensors")))
    x = randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
    F = adapter_layers(fresh)
    assert F["layers.0.q_proj"].lora_A is not F["layers.0.o_proj"].lora_A
    if share in ("A", "AB"):
        assert F["layers.0.q_proj"].lora_A is F["layers.2.q_proj"].lora_A
    # a full state_dict (every alias) loads too, keeping the sharing
    fresh2 = apply_adapters(toy(), QKVO, r=4, share=share, share_scope=scope)
    fresh2.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh2(x), m(x))
    assert count_trainable(fresh2) == count_trainable(fresh) - (16 * 3 + 3)


def test_load_rejects_inconsistent_aliases():
    m = shared_model("A", "module_type")
    sd = {k: v.clone() for k, v in m.state_dict().items() if "lora" in k or "rank_mask" in k}
    sd["layers.1.q_proj.lora_A"] += 1
    with pytest.raises(ValueError, match="differ"):
        load_adapter_state_dict(m, sd)


@pytest.mark.parametrize("share", ["A", "B", "AB"])
def test_merge_writes_each_layer_own_delta(share):
    m = shared_model(share, "attention" if share == "A" else "module_type")
    L = adapter_layers(m)
    want = {n: (lay.weight.double() + lay.scaling * lay.lora_B.double() @ lay.lora_A.double()) for n, lay in L.items()}
    merge_adapters(m)
    for n, w in want.items():
        assert_close(m.get_submodule(n).weight, w, name=n)


def test_hf_bert_shared_layer_types():
    m = apply_adapters(tiny_bert(), ["query", "key", "value"], r=4, share="A", share_scope="attention")
    assert all(isinstance(v, SharedLoRALinear) for v in adapter_layers(m).values())
    randomize_b(m)
    m(torch.randint(0, 100, (2, 7))).last_hidden_state.sum().backward()
    assert m.encoder.layer[0].attention.self.query.share_a.hits == 2 * 2


def test_triton_backend_accumulates_like_torch(triton_backend):
    pytest.importorskip("lora_kernels.gated_lora.triton", reason="triton is not importable")
    x = randn(2, 5, 16)
    ref = shared_model("AB", "module_type")
    m = copy.deepcopy(ref)
    m(x).square().sum().backward()                        # forced triton (fixture)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_KERNELS_BACKEND", "torch")
        ref(x).square().sum().backward()
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            assert_close(p.grad, q.grad.double(), name=n)
