import pytest
import torch

from lora_kernels.sensitivity import fused_sensitivity_update, per_example_gate_grad
from lora_kernels.sensitivity.reference import sensitivity_update_ref
from tests.helpers import assert_close, randn

SHAPES = [(0, (5,)), (1, (5, 7)), (2, (9, 5)), (0, (1,)), (1, (1, 1100)), (2, (13, 1)), (0, (3,)), (1, (3, 17)),
          (2, (2, 3))]
OFFS = [0, 0, 0, 5, 5, 5, 6, 6, 6]


def _inputs(dtype, noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = [randn(*s, dtype=dtype, generator=g, noncontiguous=noncontig) for _, s in SHAPES]
    G = [randn(*s, dtype=dtype, generator=g, noncontiguous=noncontig) for _, s in SHAPES]
    ipt = [torch.rand(*s, generator=g) for _, s in SHAPES]
    unc = [torch.rand(*s, generator=g) for _, s in SHAPES]
    return P, G, ipt, unc, [k for k, _ in SHAPES], list(OFFS)


def _oracle(P, G, ipt, unc, kinds, offs, b1, b2, total):
    """Per-parameter loop in float64, PEFT's RankAllocator formulas."""
    scores = torch.zeros(total, dtype=torch.float64)
    new_i, new_u = [], []
    for p, g, a, u, k, off in zip(P, G, ipt, unc, kinds, offs):
        cur = (p.double() * g.double()).abs()
        a = b1 * a.double() + (1 - b1) * cur
        u = b2 * u.double() + (1 - b2) * (cur - a).abs()
        s = a * u
        r = s if k == 0 else s.mean(1) if k == 1 else s.mean(0)
        scores[off: off + r.numel()] += r
        new_i.append(a)
        new_u.append(u)
    return new_i, new_u, scores


def _run(fn, dtype, noncontig=False, flat=False):
    P, G, ipt, unc, kinds, offs = _inputs(dtype, noncontig)
    ei, eu, es = _oracle(P, G, ipt, unc, kinds, offs, 0.85, 0.7, 9)
    if flat:  # the tracker's layout: consecutive views of one buffer
        fi, fu = torch.cat([t.reshape(-1) for t in ipt]), torch.cat([t.reshape(-1) for t in unc])
        ipt, unc, pos = [], [], 0
        for _, s in SHAPES:
            n = torch.Size(s).numel()
            ipt.append(fi[pos:pos + n].view(s))
            unc.append(fu[pos:pos + n].view(s))
            pos += n
    scores = torch.zeros(9)
    bad = fn(P, G, ipt, unc, kinds, offs, scores, 0.85, 0.7)
    assert bad.dim() == 0 and not bool(bad)
    for j in range(len(P)):
        assert_close(ipt[j], ei[j], torch.float32, name=f"ipt[{j}]")
        assert_close(unc[j], eu[j], torch.float32, name=f"unc[{j}]")
    assert_close(scores, es, torch.float32, name="scores")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("flat", [False, True])
def test_reference_matches_per_parameter_oracle(dtype, flat):
    _run(sensitivity_update_ref, dtype, flat=flat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("noncontig", [False, True])
def test_triton_matches_oracle(triton_backend, dtype, noncontig):
    _run(fused_sensitivity_update, dtype, noncontig=noncontig)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy inf-inf in the interpreter
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_grad_leaves_state_untouched(monkeypatch, backend, bad_value):
    if backend == "triton":
        import lora_kernels
        if not lora_kernels.available_backends()["triton"]["usable"]:
            pytest.skip("triton unusable here")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    P, G, ipt, unc, kinds, offs = _inputs(torch.float16)
    G[4][0, 1000] = bad_value
    before = [t.clone() for t in ipt + unc]
    scores = torch.full((9,), 7.0)
    bad = fused_sensitivity_update(P, G, ipt, unc, kinds, offs, scores, 0.85, 0.85)
    assert bool(bad)
    assert all(torch.equal(a, b) for a, b in zip(before, ipt + unc))
    assert torch.equal(scores, torch.full((9,), 7.0))


def test_empty_and_bad_arguments():
    scores = torch.zeros(3)
    assert not bool(fused_sensitivity_update([], [], [], [], [], [], scores, 0.85, 0.85))
    P, G, ipt, unc, kinds, offs = _inputs(torch.float32)
    with pytest.raises(ValueError, match="kinds\\[1\\]"):
        fused_sensitivity_update(P, G, ipt, unc, [0, 3] + kinds[2:], offs, torch.zeros(9), 0.85, 0.85)
    with pytest.raises(ValueError, match="score_offsets\\[8\\]"):
        fused_sensitivity_update(P, G, ipt, unc, kinds, offs[:8] + [8], torch.zeros(9), 0.85, 0.85)
    with pytest.raises(TypeError, match="ipt\\[0\\]"):
        fused_sensitivity_update(P, G, [ipt[0].double()] + ipt[1:], unc, kinds, offs, torch.zeros(9), 0.85, 0.85)
    with pytest.raises(ValueError, match="beta1"):
        fused_sensitivity_update(P, G, ipt, unc, kinds, offs, torch.zeros(9), 1.0, 0.85)
    with pytest.raises(ValueError, match="grads\\[2\\]"):
        fused_sensitivity_update(P, G[:2] + [G[2].t()] + G[3:], ipt, unc, kinds, offs, torch.zeros(9), 0.85, 0.85)


def test_per_example_gate_grad():
    dg = randn(12, 5)
    assert_close(per_example_gate_grad(dg, 3), dg.double().view(3, 4, 5).sum(1))
    assert per_example_gate_grad(dg[:0], 0).shape == (0, 5)
    with pytest.raises(ValueError, match="batch=5"):
        per_example_gate_grad(dg, 5)
