"""The native CPU sensitivity loop (csrc/cpu/sensitivity_cpu.cpp) against the float64 per-parameter oracle and
the pure-torch reference; its dispatch, its fp16/bf16 decoding, non-finite skips and SensitivityPlan."""
import subprocess
import sys

import pytest
import torch

import lora_kernels.sensitivity as S
from lora_kernels.sensitivity import native_cpu, op
from lora_kernels.sensitivity.reference import sensitivity_update_ref
from lora_kernels.compiled import cpu_module
from tests.helpers import assert_close, randn
from tests.lora_kernels.sensitivity.test_op import SHAPES, _inputs, _oracle

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
native = pytest.mark.skipif(cpu_module.load()[0] is None,
                            reason=f"CPU module not built: {cpu_module.load()[1]}")


def _copy(ts):
    return [t.clone() for t in ts]


@native
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_matches_oracle_and_reference(dtype):
    P, G, ipt, unc, kinds, offs = _inputs(dtype, seed=3)
    ei, eu, es = _oracle(P, G, ipt, unc, kinds, offs, 0.85, 0.7, 9)
    ri, ru, rs = _copy(ipt), _copy(unc), torch.zeros(9)
    assert not bool(sensitivity_update_ref(P, G, ri, ru, kinds, offs, rs, 0.85, 0.7))
    scores = torch.zeros(9)
    bad = native_cpu.fused_sensitivity_update(P, G, ipt, unc, kinds, offs, scores, 0.85, 0.7)
    assert bad.dim() == 0 and bad.dtype == torch.bool and not bool(bad)
    for j in range(len(P)):
        assert_close(ipt[j], ei[j], torch.float32, name=f"ipt[{j}]")
        assert_close(unc[j], eu[j], torch.float32, name=f"unc[{j}]")
        assert_close(ipt[j], ri[j].double(), torch.float32, name=f"ipt[{j}] vs reference")
    assert_close(scores, es, torch.float32, name="scores")
    assert_close(scores, rs.double(), torch.float32, name="scores vs reference")


@native
@pytest.mark.parametrize("shape_r", [(1, 1), (7, 3), (33, 1), (5, 1543), (1543, 5), (12, 384)])
def test_native_odd_shapes_accumulate_into_scores(shape_r):
    a_shape, r = shape_r, shape_r[0]
    b_shape = (shape_r[1], r)
    g = torch.Generator().manual_seed(1)
    shapes, kinds = [(r,), a_shape, b_shape], [0, 1, 2]
    P = [randn(*s, generator=g) for s in shapes]
    G = [randn(*s, generator=g) for s in shapes]
    ipt = [torch.rand(*s, generator=g) for s in shapes]
    unc = [torch.rand(*s, generator=g) for s in shapes]
    offs = [2, 2, 2]
    ei, eu, es = _oracle(P, G, ipt, unc, kinds, offs, 0.85, 0.85, r + 3)
    scores = torch.full((r + 3,), 0.5)  # accumulated into, not overwritten
    assert not bool(native_cpu.fused_sensitivity_update(P, G, ipt, unc, kinds, offs, scores, 0.85, 0.85))
    assert_close(scores, es + 0.5, torch.float32, name="scores")
    for j in range(3):
        assert_close(ipt[j], ei[j], torch.float32, name=f"ipt[{j}]")
        assert_close(unc[j], eu[j], torch.float32, name=f"unc[{j}]")


@native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_native_decodes_every_finite_half_value_exactly(dtype, monkeypatch):
    # bf16 subnormals are fp32 subnormals: exact only with flush-to-zero off (test_ftz covers it on)
    monkeypatch.setenv(native_cpu.FLUSH_ENV, "0")
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    p = bits[torch.isfinite(bits)].contiguous()         # every finite pattern: subnormals, ±0, max
    g = torch.ones_like(p)
    ipt, unc, scores = torch.full(p.shape, 3.0), torch.full(p.shape, 3.0), torch.zeros(p.numel())
    # beta1 = beta2 = 0: ipt = |w g| exactly as decoded, unc = 0
    assert not bool(native_cpu.fused_sensitivity_update([p], [g], [ipt], [unc], [0], [0], scores, 0.0, 0.0))
    assert torch.equal(ipt, p.float().abs())
    assert torch.equal(unc, torch.zeros_like(unc))


@native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_native_nonfinite_grad_leaves_state_untouched(dtype, bad_value):
    P, G, ipt, unc, kinds, offs = _inputs(dtype)
    G[-1][1, 2] = bad_value                          # the LAST tensor: nothing before it may be written
    before = _copy(ipt + unc)
    scores = torch.full((9,), 7.0)
    assert bool(native_cpu.fused_sensitivity_update(P, G, ipt, unc, kinds, offs, scores, 0.85, 0.85))
    assert all(torch.equal(a, b) for a, b in zip(before, ipt + unc))
    assert torch.equal(scores, torch.full((9,), 7.0))


@native
def test_native_is_deterministic_across_thread_counts():
    P, G, ipt, unc, kinds, offs = _inputs(torch.float32, seed=5)
    out = []
    for n in (1, 2, 3):
        i, u, s = _copy(ipt), _copy(unc), torch.zeros(9)
        native_cpu.fused_sensitivity_update(P, G, i, u, kinds, offs, s, 0.85, 0.85, n_threads=n)
        out.append((i, u, s))
    for i, u, s in out[1:]:
        assert torch.equal(s, out[0][2])
        assert all(torch.equal(a, b) for a, b in zip(i + u, out[0][0] + out[0][1]))


@native
def test_native_empty_and_zero_size_tensors():
    assert not bool(native_cpu.fused_sensitivity_update([], [], [], [], [], [], torch.zeros(2), 0.85, 0.85))
    z = torch.zeros(0, 4)
    scores = torch.zeros(2)
    assert not bool(native_cpu.fused_sensitivity_update([z], [z.clone()], [z.clone()], [z.clone()], [1], [0], scores,
                                                0.85, 0.85))
    assert torch.equal(scores, torch.zeros(2))
    with pytest.raises(ValueError, match="params\\[0\\]"):
        native_cpu.fused_sensitivity_update([randn(3, 4)[:, ::2]], [randn(3, 2)], [torch.zeros(3, 2)],
                                            [torch.zeros(3, 2)], [1], [0], scores, 0.85, 0.85)


@native
def test_module_checks_table_rows():
    mod = cpu_module.require()
    t = torch.tensor([[1, 1, 1, 1, 4, 3, 0, 1, 0]], dtype=torch.int64)
    s = torch.zeros(4)
    with pytest.raises(ValueError, match="row 0: kind"):
        mod.sensitivity_update(t.data_ptr(), 1, s.data_ptr(), 4, 0.85, 0.85, 1)
    t[0, 5], t[0, 8] = 0, 2
    with pytest.raises(ValueError, match="score_offset 2"):
        mod.sensitivity_update(t.data_ptr(), 1, s.data_ptr(), 4, 0.85, 0.85, 1)
    with pytest.raises(ValueError, match="beta2"):
        mod.sensitivity_update(t.data_ptr(), 1, s.data_ptr(), 4, 0.85, 1.0, 1)


def _spy(monkeypatch):
    calls = []
    for name, mod, attr in (("native", native_cpu, "fused_sensitivity_update"),
                            ("torch", op.REGISTRY["torch"], "fused_sensitivity_update")):
        fn = getattr(mod, attr)
        monkeypatch.setattr(mod, attr, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    return calls


@native
def test_dispatch_native_for_contiguous_reference_otherwise(monkeypatch):
    """The dispatcher (lora_kernels.dispatch, the only place that picks a backend) gives dense CPU problems to the
    native loop and anything else to the reference; LORA_KERNELS_BACKEND=torch forces the reference."""
    calls = _spy(monkeypatch)
    for noncontig, env, want in ((False, "auto", "native"), (True, "auto", "torch"), (False, "torch", "torch"),
                                 (False, "native", "native")):
        monkeypatch.setenv("LORA_KERNELS_BACKEND", env)
        P, G, ipt, unc, kinds, offs = _inputs(torch.bfloat16, noncontig=noncontig)
        ei, eu, es = _oracle(P, G, ipt, unc, kinds, offs, 0.85, 0.85, 9)
        scores = torch.zeros(9)
        S.fused_sensitivity_update(P, G, ipt, unc, kinds, offs, scores, 0.85, 0.85)
        assert calls[-1] == want, (noncontig, env, calls)
        assert_close(scores, es, torch.float32, name=f"scores ({want})")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "native")
    P, G, ipt, unc, kinds, offs = _inputs(torch.bfloat16, noncontig=True)
    with pytest.raises(Exception, match="contiguous"):   # forced but unusable: raises with the reason
        S.fused_sensitivity_update(P, G, ipt, unc, kinds, offs, torch.zeros(9), 0.85, 0.85)


@native
@pytest.mark.parametrize("env", ["auto", "torch"])
def test_plan_matches_oracle_and_falls_back(monkeypatch, env):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", env)
    P, G, ipt, unc, kinds, offs = _inputs(torch.float16, seed=7)
    P[0], G[0] = P[0].view(-1, 1), G[0].view(-1, 1)     # PEFT's λ is [R, 1]
    plan = S.SensitivityPlan(P, ipt, unc, kinds, offs, 9)
    for step in range(2):
        flat = [t.reshape(-1) if k == 0 else t for t, k in zip(P, kinds)]
        gflat = [t.reshape(-1) if k == 0 else t for t, k in zip(G, kinds)]
        ei, eu, es = _oracle(flat, gflat, ipt, unc, kinds, offs, 0.85, 0.85, 9)
        scores = torch.zeros(9)
        assert not bool(plan(P, G, scores, 0.85, 0.85))
        assert_close(scores, es, torch.float32, name=f"scores step {step}")
        for j in range(len(P)):
            assert_close(ipt[j], ei[j], torch.float32, name=f"ipt[{j}]")
        G[2] = randn(*SHAPES[2][1], dtype=torch.float16, noncontiguous=True)  # step 2 takes the fallback
    G[1][0, 0] = float("nan")
    before = _copy(ipt + unc)
    assert bool(plan(P, G, torch.zeros(9), 0.85, 0.85))
    assert all(torch.equal(a, b) for a, b in zip(before, ipt + unc))
    with pytest.raises(ValueError, match="plan covers 9"):
        plan(P[:3], G[:3], torch.zeros(9), 0.85, 0.85)


@native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_plan_update_checked_codes_and_untouched_state(dtype, bad_value):
    P, G, ipt, unc, kinds, offs = _inputs(dtype, seed=5)
    plan = S.SensitivityPlan(P, ipt, unc, kinds, offs, 9)
    ei, eu, es = _oracle(P, G, ipt, unc, kinds, offs, 0.85, 0.85, 9)
    scores = torch.zeros(9)
    assert plan.update_checked(P, G, scores, 0.85, 0.85) == op.SENS_OK       # same step as plan(...)
    assert_close(scores, es, torch.float32, name="scores")
    for j in range(len(P)):
        assert_close(ipt[j], ei[j], torch.float32, name=f"ipt[{j}]")
        assert_close(unc[j], eu[j], torch.float32, name=f"unc[{j}]")
    before = _copy(ipt + unc)
    P[4].view(-1)[-1] = bad_value                                             # a weight: its own code
    s = torch.zeros(9)
    assert plan.update_checked(P, G, s, 0.85, 0.85) == op.SENS_BAD_PARAM
    G[2].view(-1)[0] = bad_value                                             # both bad: the weight wins
    assert plan.update_checked(P, G, s, 0.85, 0.85) == op.SENS_BAD_PARAM
    P[4].view(-1)[-1] = 0.5
    assert plan.update_checked(P, G, s, 0.85, 0.85) == op.SENS_BAD_GRAD
    assert not bool(s.any()) and all(torch.equal(a, b) for a, b in zip(before, ipt + unc))
    # plain plan(...) still checks gradients only (the codes are opt-in)
    G[2].view(-1)[0] = 0.25
    P[4].view(-1)[-1] = bad_value
    assert not bool(plan(P, G, torch.zeros(9), 0.85, 0.85))


@native
def test_plan_update_checked_declines_when_native_cannot_run(monkeypatch):
    P, G, ipt, unc, kinds, offs = _inputs(torch.float32, seed=6)
    plan = S.SensitivityPlan(P, ipt, unc, kinds, offs, 9)
    before = _copy(ipt + unc)
    G2 = list(G)
    G2[1] = randn(*SHAPES[1][1], noncontiguous=True)
    assert plan.update_checked(P, G2, torch.zeros(9), 0.85, 0.85) is None      # non-contiguous gradient
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    assert plan.update_checked(P, G, torch.zeros(9), 0.85, 0.85) is None       # torch backend forced
    monkeypatch.delenv("LORA_KERNELS_BACKEND")
    monkeypatch.setattr(native_cpu, "has_checked", lambda mod: False)        # a module built before the check
    assert plan.update_checked(P, G, torch.zeros(9), 0.85, 0.85) is None
    assert all(torch.equal(a, b) for a, b in zip(before, ipt + unc))
    with pytest.raises(ValueError, match="plan covers 9"):
        plan.update_checked(P[:3], G[:3], torch.zeros(9), 0.85, 0.85)


def test_import_does_not_load_cpu_module():
    code = ("import sys, lora_kernels, python_api, lora_kernels.sensitivity, python_api.allocators.sensitivity; "
            "print('lora_kernels._lora_kernels_cpu' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert res.stdout.strip().splitlines()[-1] == "False"
