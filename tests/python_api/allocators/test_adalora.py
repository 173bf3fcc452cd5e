import copy

import pytest
import torch
from torch import nn

from python_api.allocators.adalora import AdaLoRAAllocator, budget_schedule, orthogonality_penalty, peft_adapters
from python_api.layers import LoRALinear
from tests.helpers import assert_close

peft = pytest.importorskip("peft")


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 20), nn.Linear(20, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _peft_model(total_step, tinit, tfinal, deltaT):
    torch.manual_seed(0)
    cfg = peft.AdaLoraConfig(init_r=6, target_r=2, target_modules=["fc1", "fc2", "fc3"], lora_alpha=8,
                             total_step=total_step, tinit=tinit, tfinal=tfinal, deltaT=deltaT, lora_dropout=0.0)
    return peft.get_peft_model(_MLP(), cfg)


def test_agrees_with_peft_rank_allocator():
    total, tinit, tfinal, dT = 24, 3, 5, 2
    mp = _peft_model(total, tinit, tfinal, dT)
    mo = copy.deepcopy(mp)
    ours = AdaLoRAAllocator(peft_adapters(mo), target_r=2, total_step=total, tinit=tinit, tfinal=tfinal, deltaT=dT)
    opt_p = torch.optim.Adam([p for p in mp.parameters() if p.requires_grad], lr=3e-2)
    opt_o = torch.optim.Adam([p for p in mo.parameters() if p.requires_grad], lr=3e-2)
    gen = torch.Generator().manual_seed(1)
    ra = mp.base_model.rankallocator
    n_masks = 0
    for step in range(total + 3):
        x = torch.randn(16, 12, generator=gen)
        y = torch.randn(16, 3, generator=gen)
        for m, opt in ((mp, opt_p), (mo, opt_o)):
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
        mp.base_model.update_and_allocate(step)
        pattern = ours.update_and_allocate(step)
        opt_p.zero_grad()
        opt_o.zero_grad()
        if step < total - tfinal:  # PEFT resets its state at the final mask
            for name in peft_adapters(mp):
                off = ours.tracker.names.index(name) * 3
                for j, key in enumerate(("lora_E", "lora_A", "lora_B")):
                    pname = f"{name.removeprefix('base_model.model.')}.{key}.default"
                    assert_close(ours.tracker.ipt[off + j].view_as(ra.exp_avg_ipt[pname]),
                                 ra.exp_avg_ipt[pname].double(), name=f"ipt {pname}")
                    assert_close(ours.tracker.unc[off + j].view_as(ra.exp_avg_unc[pname]),
                                 ra.exp_avg_unc[pname].double(), name=f"unc {pname}")
        if pattern is not None:
            n_masks += 1
            theirs = {"base_model.model." + k.replace(".lora_E.default", ""): v
                      for k, v in mp.peft_config["default"].rank_pattern.items()}
            assert theirs == pattern, f"step {step}"
        for (n1, p1), (_, p2) in zip(mp.named_parameters(), mo.named_parameters()):
            assert torch.equal(p1, p2), f"step {step}: {n1} diverged"
    assert n_masks >= 5
    assert sum(map(sum, ours.rank_pattern.values())) == 2 * 3


def test_masked_lambda_revives():
    # Masking zeroes λ but leaves it trainable (PEFT semantics): the next step moves it off zero again,
    # so a later mask may keep the triplet.
    mp = _peft_model(30, 0, 0, 1)
    ours = AdaLoRAAllocator(peft_adapters(mp), target_r=2, total_step=30, deltaT=1)
    opt = torch.optim.Adam([p for p in mp.parameters() if p.requires_grad], lr=5e-2)
    gen = torch.Generator().manual_seed(2)
    revived, pattern = 0, None
    for step in range(1, 9):
        x = torch.randn(16, 12, generator=gen)
        nn.functional.mse_loss(mp(x), torch.sin(x[:, :3] * 3)).backward()
        opt.step()
        if step > 1:
            revived += sum(int(((e.view(-1) != 0) & ~torch.tensor(keep)).sum())
                           for (e, _, _), keep in zip(ours.adapters.values(), pattern.values()))
        pattern = ours.update_and_allocate(step)
        assert pattern is not None
        for (e, _, _), keep in zip(ours.adapters.values(), pattern.values()):
            assert torch.all(e.view(-1)[~torch.tensor(keep)] == 0)
        opt.zero_grad()
    assert revived > 0


def test_budget_schedule_matches_peft():
    mp = _peft_model(100, 10, 20, 5)
    ra = mp.base_model.rankallocator
    for step in range(101):
        assert budget_schedule(step, ra.init_bgt, ra.target_bgt, 100, 10, 20, 5) == ra.budget_schedule(step)


def test_orthogonality_penalty_matches_peft_formula():
    torch.manual_seed(0)
    layers = nn.ModuleDict({"a": LoRALinear(10, 7, 4, svd=True), "b": LoRALinear(7, 9, 3, svd=True)})
    got = orthogonality_penalty(layers)
    terms = []
    for m in layers.values():
        terms.append(torch.norm(m.lora_A @ m.lora_A.T - torch.eye(m.r), p="fro"))
        terms.append(torch.norm(m.lora_B.T @ m.lora_B - torch.eye(m.r), p="fro"))
    assert_close(got, (sum(terms) / len(terms)).double())
    got.backward()
    assert layers["a"].lora_A.grad is not None


def test_resume_gives_same_next_decision():
    def run(n_steps, alloc, model, opt, gen):
        out = None
        for step in range(alloc.tracker.step, n_steps):
            x = torch.randn(16, 12, generator=gen)
            nn.functional.mse_loss(model(x), torch.cos(x[:, :3])).backward()
            opt.step()
            out = alloc.update_and_allocate(step)
            opt.zero_grad()
        return out

    mp = _peft_model(40, 2, 5, 3)
    alloc = AdaLoRAAllocator(peft_adapters(mp), target_r=2, total_step=40, tinit=2, tfinal=5, deltaT=3)
    opt = torch.optim.Adam([p for p in mp.parameters() if p.requires_grad], lr=3e-2)
    gen = torch.Generator().manual_seed(3)
    run(10, alloc, mp, opt, gen)
    snap = (copy.deepcopy(mp.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(alloc.state_dict()),
            gen.get_state())
    ref = run(13, alloc, mp, opt, gen)
    assert ref is not None
    mp2 = _peft_model(40, 2, 5, 3)
    mp2.load_state_dict(snap[0])
    opt2 = torch.optim.Adam([p for p in mp2.parameters() if p.requires_grad], lr=3e-2)
    opt2.load_state_dict(snap[1])
    alloc2 = AdaLoRAAllocator(peft_adapters(mp2), target_r=2, total_step=40, tinit=2, tfinal=5, deltaT=3)
    alloc2.load_state_dict(snap[2])
    gen2 = torch.Generator()
    gen2.set_state(snap[3])
    assert run(13, alloc2, mp2, opt2, gen2) == ref


def test_refuses_non_svd_adapters():
    with pytest.raises(ValueError, match="lora_E"):
        AdaLoRAAllocator(LoRALinear(8, 8, 4), target_r=2, total_step=10)
