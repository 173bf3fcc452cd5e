import json
import math

import pytest
import torch
from torch import nn

from python_api.layers import LoRALinear
from python_api.allocators.shaplora import (
    allocate_ranks,
    apply_rank_masks,
    exact_shapley,
    masks_from_config,
    permutation_shapley,
    rank_pattern_config,
    shapley_sensitivity,
    shaplora_workflow,
    to_peft_lora_config,
    to_peft_rank_pattern,
)
from tests.helpers import adam_pass, assert_close


class Toy(nn.Module):
    """ALGORITHMS.md §3's toy: one rank-10 SVD adapter on a small frozen MLP."""

    def __init__(self, r=10):
        super().__init__()
        self.fc1 = LoRALinear(16, 32, r, alpha=r, svd=True)
        self.fc2 = nn.Linear(32, 4)
        self.fc2.requires_grad_(False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean(1)


def spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def _trained_toy(r=10, steps=300, seed=0):
    torch.manual_seed(seed)
    m = Toy(r)
    teacher = Toy(r)
    teacher.load_state_dict(m.state_dict())
    with torch.no_grad():
        teacher.fc1.weight += 0.5 * torch.randn(32, 10) @ torch.randn(10, 16) / 4
    g = torch.Generator().manual_seed(seed + 1)

    def data(n):
        x = torch.randn(n, 16, generator=g)
        with torch.no_grad():
            return x, teacher(x)
    xtr, ytr = data(1024)
    xv, yv = data(512)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        i = torch.randint(0, 1024, (64,), generator=g)
        loss = mse(m, (xtr[i], ytr[i])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m, [(xv, yv)], (xtr, ytr)


@pytest.fixture(scope="module")
def toy():
    return _trained_toy()


def test_exact_matches_hand_computed_game():
    # v({}) = 0, v({0}) = 1, v({1}) = 2, v({2}) = 0, v({0,1}) = 4, v({0,2}) = 1, v({1,2}) = 3, v(all) = 6
    table = {(): 0, (0,): 1, (1,): 2, (2,): 0, (0, 1): 4, (0, 2): 1, (1, 2): 3, (0, 1, 2): 6}

    def v(mask):
        return table[tuple(mask.nonzero().flatten().tolist())]
    # by hand: φ0 = (1/3)(1-0) + (1/6)(4-2) + (1/6)(1-0) + (1/3)(6-3) = 1/3 + 1/3 + 1/6 + 1 = 11/6
    # φ1 = (1/3)(2) + (1/6)(4-1) + (1/6)(3-0) + (1/3)(6-1) = 2/3 + 1/2 + 1/2 + 5/3 = 10/3
    # φ2 = (1/3)(0) + (1/6)(1-1) + (1/6)(3-2) + (1/3)(6-4) = 1/6 + 2/3 = 5/6
    phi = exact_shapley(v, 3)
    assert_close(phi, torch.tensor([11 / 6, 10 / 3, 5 / 6], dtype=torch.float64), dtype=torch.float64)
    assert math.isclose(float(phi.sum()), 6.0)  # efficiency


def test_permutation_converges_to_exact():
    w = torch.randn(6, generator=torch.Generator().manual_seed(0))

    def v(mask):  # a game with interactions
        s = float((w * mask).sum())
        return s * s + float(mask.sum()) ** 0.5
    exact = exact_shapley(v, 6)
    errs = []
    for n in (20, 2000):
        phi, se = permutation_shapley(v, 6, n, torch.Generator().manual_seed(1))
        errs.append(float((phi - exact).abs().max()))
        assert bool(((phi - exact).abs() <= 5 * se + 1e-12).all())
    assert errs[1] < errs[0] and errs[1] < 0.05 * float(exact.abs().max())


def test_taylor_all_on_equals_adalora_sensitivity(toy):
    m, val, _ = toy
    x, y = val[0][0][:64], val[0][1][:64]
    phi = shapley_sensitivity(m, [(x, y)], "taylor", loss_fn=mse, q=1.0)["fc1"]
    m.zero_grad()
    mse(m, (x, y)).sum().backward()
    lam_sens = (m.fc1.lora_E * m.fc1.lora_E.grad).abs().detach()
    assert_close(64 * phi.abs(), lam_sens.double(), dtype=torch.float32)
    m.zero_grad()


def test_taylor_rank_correlates_with_exact(toy):
    m, val, _ = toy
    exact = shapley_sensitivity(m, val, "exact", loss_fn=mse)["fc1"]
    val4 = [(val[0][0][i:i + 128], val[0][1][i:i + 128]) for i in range(0, 512, 128)]
    taylor, se = shapley_sensitivity(m, val4, "taylor", loss_fn=mse, generator=torch.Generator().manual_seed(5),
                                     return_stats=True)
    rho = spearman(taylor["fc1"], exact)
    all_on = shapley_sensitivity(m, val4, "taylor", loss_fn=mse, q=1.0)["fc1"]
    print(f"\nSpearman rho taylor(1 pass, 512 ex) vs exact = {rho:.3f}; all-on |λ∇λ| vs exact = "
          f"{spearman(all_on.abs(), exact):.3f}")
    assert rho >= 0.9
    assert bool((se["fc1"] > 0).all())
    # the model is left as it was
    assert m.fc1.rank_mask.all() and m.fc1._token_gate is None and m.training


def test_permutation_mode_close_to_exact_on_model():
    torch.manual_seed(0)
    m = Toy(4)
    with torch.no_grad():
        m.fc1.lora_E.normal_()
    x = torch.randn(64, 16)
    batches = [(x, torch.randn(64, 4))]
    exact = shapley_sensitivity(m, batches, "exact", loss_fn=mse)["fc1"]
    perm = shapley_sensitivity(m, batches, "permutation", loss_fn=mse, num_permutations=400,
                               generator=torch.Generator().manual_seed(0))["fc1"]
    assert float((perm - exact).abs().max()) < 0.1 * float(exact.abs().max())


def test_masked_ranks_are_not_players():
    torch.manual_seed(0)
    m = Toy(4)
    with torch.no_grad():
        m.fc1.lora_E.normal_()
    m.fc1.set_rank_mask([1, 0, 1, 1])
    batches = [(torch.randn(8, 16), torch.randn(8, 4))]
    for mode in ("taylor", "exact"):
        s = shapley_sensitivity(m, batches, mode, loss_fn=mse)["fc1"]
        assert math.isnan(s[1]) and not torch.isnan(s[[0, 2, 3]]).any()
    assert m.fc1.rank_mask.tolist() == [True, False, True, True]


def test_sequence_batches_and_errors():
    torch.manual_seed(0)
    layer = LoRALinear(8, 8, 3, svd=True)
    with torch.no_grad():
        layer.lora_E.normal_()
    model = nn.Sequential(layer)
    x = torch.randn(4, 5, 8)  # [B, S, K]: each example's coalition covers its 5 tokens
    s = shapley_sensitivity(model, [x], loss_fn=lambda mod, b: mod(b).pow(2).sum((1, 2)), q=1.0)["0"]
    layer.zero_grad()
    model(x).pow(2).sum().backward()
    assert_close(4 * s.abs(), (layer.lora_E * layer.lora_E.grad).abs().double(), dtype=torch.float32)
    with pytest.raises(ValueError, match="mode"):
        shapley_sensitivity(model, [x], "shap", loss_fn=lambda mod, b: mod(b).sum((1, 2)))
    with pytest.raises(ValueError, match="per-example"):
        shapley_sensitivity(model, [x], loss_fn=lambda mod, b: mod(b).sum())
    with pytest.raises(ValueError, match="n must be"):
        exact_shapley(lambda mask: 0.0, 13)


def test_allocate_ranks_global_top_b_and_export():
    scores = {"a": torch.tensor([0.5, -1.0, 2.0]), "b": torch.tensor([0.1, float("nan"), 3.0, 0.7])}
    masks = allocate_ranks(scores, 3)
    assert masks["a"].tolist() == [False, False, True] and masks["b"].tolist() == [False, False, True, True]
    assert allocate_ranks(scores, 3, by="abs")["a"].tolist() == [False, True, True]
    assert sum(int(m.sum()) for m in allocate_ranks(scores, 0).values()) == 0
    with pytest.raises(ValueError, match="budget"):
        allocate_ranks(scores, 7)
    assert to_peft_rank_pattern(masks) == {"a": 1, "b": 2}
    cfg = to_peft_lora_config(masks, lora_alpha=8)
    assert cfg.rank_pattern == {"a": 1, "b": 2} and cfg.r == 2
    own = json.loads(json.dumps(rank_pattern_config(masks)))
    back = masks_from_config(own)
    assert all(torch.equal(back[k], masks[k]) for k in masks)


def test_peft_rank_pattern_builds_model():
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    masks = {"0": torch.tensor([1, 1, 0, 1], dtype=torch.bool), "2": torch.tensor([1, 0, 0, 0], dtype=torch.bool)}
    pm = peft.get_peft_model(base, to_peft_lora_config(masks, lora_alpha=4))
    assert pm.base_model.model[0].lora_A["default"].weight.shape[0] == 3
    assert pm.base_model.model[2].lora_A["default"].weight.shape[0] == 1


def test_workflow_end_to_end_and_reproducible():
    m0, val, (xtr, ytr) = _trained_toy(steps=0)
    teacher_val = val

    def build():
        torch.manual_seed(0)
        net = Toy(10)
        net.load_state_dict({k: v for k, v in m0.state_dict().items() if not k.startswith("fc1.lora")},
                            strict=False)
        return net

    def train(net):
        adam_pass(net, mse, xtr, ytr, n=1024, batch=64, lr=1e-2)

    def evaluate(net):
        with torch.no_grad():
            return float(mse(net, teacher_val[0]).mean())
    out = shaplora_workflow(build, train, val, evaluate, loss_fn=mse, r_target=4, rounds=2, seed=3)
    assert int(out["masks"]["fc1"].sum()) == 4 and out["peft_rank_pattern"] == {"fc1": 4}
    assert out["model"].fc1.active_rank == 4 and math.isfinite(out["result"])
    again = shaplora_workflow(build, train, val, evaluate, loss_fn=mse, r_target=4, rounds=2, seed=3)
    assert torch.equal(again["masks"]["fc1"], out["masks"]["fc1"])


def test_apply_rank_masks_rejects_unknown():
    with pytest.raises(KeyError, match="nope"):
        apply_rank_masks(Toy(4), {"nope": torch.ones(4, dtype=torch.bool)})


def test_taylor_pass_freezes_adapters_only_while_scoring(toy):
    """The pass reads the gates' gradients only: A, B, λ are frozen during it (the op then skips dA, dB) and get
    their flags back afterwards, after an error too; nothing accumulates in their .grad."""
    m, val, _ = toy
    m.fc1.lora_B.requires_grad_(False)                     # a user's own choice is kept as it was
    seen = []
    m.fc1.register_forward_pre_hook(lambda mod, args: seen.append(
        [p.requires_grad for p in (mod.lora_A, mod.lora_B, mod.lora_E)]))
    try:
        shapley_sensitivity(m, val, "taylor", loss_fn=mse, generator=torch.Generator().manual_seed(0))
        assert seen and all(flags == [False, False, False] for flags in seen)
        assert [m.fc1.lora_A.requires_grad, m.fc1.lora_B.requires_grad, m.fc1.lora_E.requires_grad] == \
            [True, False, True]
        assert all(p.grad is None for p in (m.fc1.lora_A, m.fc1.lora_E))

        def bad_loss(model, batch):
            raise RuntimeError("boom")
        with pytest.raises(RuntimeError, match="boom"):
            shapley_sensitivity(m, val, "taylor", loss_fn=bad_loss)
        assert [m.fc1.lora_A.requires_grad, m.fc1.lora_B.requires_grad, m.fc1.lora_E.requires_grad] == \
            [True, False, True]
    finally:
        m.fc1.lora_B.requires_grad_(True)
        m.fc1._forward_pre_hooks.clear()
