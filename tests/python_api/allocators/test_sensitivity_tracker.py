import pytest
import torch
from torch import nn

from python_api.layers import LoRALinear
from python_api.allocators.sensitivity import SensitivityTracker
from tests.helpers import assert_close


def _model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(LoRALinear(12, 10, 4, svd=True), nn.Tanh(), LoRALinear(10, 6, 3, svd=True), nn.Tanh(),
                      LoRALinear(6, 5, 2))
    with torch.no_grad():
        for layer in (m[0], m[2]):
            layer.lora_E.normal_()
        m[4].lora_B.normal_()
    return m


def _step(m, seed):
    g = torch.Generator().manual_seed(seed)
    m.zero_grad()
    m(torch.randn(8, 12, generator=g)).pow(2).mean().backward()


def _oracle_scores(m, states, b1=0.85, b2=0.85):
    """Per-parameter loop (PEFT's update_ipt + mask_to_budget triplet) in float64."""
    out = {}
    for name, layer in (("0", m[0]), ("2", m[2]), ("4", m[4])):
        parts = []
        for key, t in (("E", layer.lora_E), ("A", layer.lora_A), ("B", layer.lora_B)):
            if t is None:
                continue
            a, u = states.setdefault((name, key), (torch.zeros_like(t, dtype=torch.float64),) * 2)
            cur = (t.double() * t.grad.double()).abs()
            a = b1 * a + (1 - b1) * cur
            u = b2 * u + (1 - b2) * (cur - a).abs()
            states[(name, key)] = (a, u)
            s = a * u
            parts.append(s if key == "E" else s.mean(1) if key == "A" else s.mean(0))
        out[name] = sum(parts)
    return out


def test_tracker_matches_per_parameter_loop():
    m = _model()
    tr = SensitivityTracker(m)
    assert tr.names == ["0", "2", "4"] and tr.total_rank == 9
    states = {}
    for step in range(4):
        _step(m, step)
        assert not bool(tr.update())
        want = _oracle_scores(m, states)
        got = tr.rank_scores()
        for name in want:
            assert_close(got[name], want[name].detach(), torch.float32, name=name)


def test_nonfinite_step_skipped_and_counted():
    m = _model()
    tr = SensitivityTracker(m)
    _step(m, 0)
    tr.update()
    snap = tr.state_dict()
    _step(m, 1)
    m[2].lora_A.grad[1, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert bool(tr.update())
    assert tr.skipped_steps == 1
    assert torch.equal(tr.state_dict()["ipt"], snap["ipt"]) and torch.equal(tr.scores, snap["scores"])
    _step(m, 2)
    assert not bool(tr.update()) and tr.skipped_steps == 1


def test_state_dict_roundtrip_is_lossless():
    m = _model()
    tr = SensitivityTracker(m)
    for s in range(3):
        _step(m, s)
        tr.update()
    state = tr.state_dict()
    tr2 = SensitivityTracker(m)
    tr2.load_state_dict(state)
    _step(m, 9)
    tr.update()
    tr2.update()
    assert torch.equal(tr.scores, tr2.scores) and tr2.step == tr.step == 4
    with pytest.raises(ValueError, match="modules"):
        SensitivityTracker({"x": (None, m[0].lora_A, m[0].lora_B)}).load_state_dict(state)


def test_missing_grad_counts_as_zero_and_bad_input():
    m = _model()
    tr = SensitivityTracker(m)
    with pytest.warns(RuntimeWarning, match="no tracked adapter tensor has a gradient"):
        assert bool(tr.update())   # no backward yet: all grads None, skipped (not scored as zeros)
    assert torch.equal(tr.scores, torch.zeros(9)) and tr.skipped_steps == 1
    _step(m, 1)
    m[0].lora_A.grad = None        # one tensor without a gradient counts as zero: the others still inform
    tr.update()
    assert tr.skipped_steps == 1 and bool((tr.scores > 0).any())
    with pytest.raises(ValueError, match="no LoRALinear"):
        SensitivityTracker(nn.Linear(3, 3))


@pytest.mark.parametrize("native_check", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weight_skipped_through_the_cached_flat_views(bad, native_check, monkeypatch):
    # native_check: the native loop's pre-pass checks the weights; False: a compiled module without that check,
    # so the tracker's own check (one aminmax over cached flat views) runs.
    from lora_kernels.sensitivity import native_cpu
    if not native_check:
        monkeypatch.setattr(native_cpu, "has_checked", lambda mod: False)
    # The weight check reads cached flat views of the weights: in-place edits, a replaced storage (p.data = ...)
    # and a non-contiguous weight must all be seen.
    m = _model()
    tr = SensitivityTracker(m)
    _step(m, 0)
    assert not bool(tr.update())
    with torch.no_grad():
        m[0].lora_B[3, 1] = bad                                   # in place: same storage as the cached view
    _step(m, 1)
    with pytest.warns(RuntimeWarning, match=r"non-finite weight in modules \['0'\]"):
        assert bool(tr.update())
    with torch.no_grad():
        m[0].lora_B[3, 1] = 0.5
    _step(m, 2)
    assert not bool(tr.update())
    snap = tr.state_dict()
    fresh = m[2].lora_A.detach().t().contiguous().t()             # new storage, non-contiguous [R, K]
    fresh[0, 0] = bad
    m[2].lora_A.data = fresh
    _step(m, 3)
    with pytest.warns(RuntimeWarning, match=r"non-finite weight in modules \['2'\]"):
        assert bool(tr.update())
    assert tr.skipped_steps == 2 and torch.equal(tr.state_dict()["ipt"], snap["ipt"])
    with torch.no_grad():
        m[2].lora_A[0, 0] = 0.25
    _step(m, 4)
    assert not bool(tr.update()) and torch.isfinite(tr.scores).all()


def test_nonfinite_weight_check_with_mixed_dtypes():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 7, generator=g, dtype=torch.float64)
    b = torch.randn(5, 3, generator=g).to(torch.bfloat16)
    for t in (a, b):
        t.grad = torch.randn(t.shape, generator=g).to(t.dtype)
    tr = SensitivityTracker({"m": (None, a, b)})
    assert not bool(tr.update())
    b[4, 2] = float("-inf")
    with pytest.warns(RuntimeWarning, match=r"non-finite weight in modules \['m'\]"):
        assert bool(tr.update())
    b[4, 2] = 1.0
    a[0, 0] = 1e300                                   # finite: beyond float32 but not a skipped step
    assert not bool(tr.update())
