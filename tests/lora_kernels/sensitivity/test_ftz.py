"""The native sensitivity loop runs with flush-to-zero on and leaves the caller's setting as it found it; results
still match the reference (they differ only below fp32's smallest normal, 1.2e-38)."""
import pytest
import torch

from lora_kernels import sensitivity as S
from lora_kernels.compiled import cpu_module
from lora_kernels.sensitivity import native_cpu
from lora_kernels.sensitivity.reference import sensitivity_update_ref

pytestmark = pytest.mark.skipif(cpu_module.load()[0] is None, reason="compiled CPU module not available")


def _problem(unc_value):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g)]
    grads = [torch.zeros(p.shape) if unc_value < 1e-38 else torch.randn(p.shape, generator=g) for p in params]
    # I = |w·g| and Ī: zero for the subnormal case, so Ū = β2·Ū only decays (0.85e-39: subnormal unless flushed)
    ipt = [(p * q).abs() for p, q in zip(params, grads)]
    unc = [torch.full(p.shape, unc_value) for p in params]
    return params, grads, ipt, unc, [1, 2], [0, 0]


def test_flush_setting_restored_and_subnormals_flushed():
    assert not native_cpu._flush_denormal_on()
    params, grads, ipt, unc, kinds, offs = _problem(1e-39)    # subnormal state
    scores = torch.zeros(4)
    S.fused_sensitivity_update(params, grads, ipt, unc, kinds, offs, scores, 0.85, 0.85)
    assert not native_cpu._flush_denormal_on()                          # the default (off) is back
    assert all(bool((u == 0).all()) for u in unc)              # 0.85 · 1e-39 flushed (DAZ/FTZ), not kept subnormal
    torch.set_flush_denormal(True)
    try:
        S.fused_sensitivity_update(*_problem(1e-3)[:4], kinds, offs, torch.zeros(4), 0.85, 0.85)
        assert native_cpu._flush_denormal_on()                          # a caller's own setting is left on
    finally:
        torch.set_flush_denormal(False)


def test_subnormals_kept_with_flushing_switched_off(monkeypatch):
    monkeypatch.setenv(native_cpu.FLUSH_ENV, "0")
    params, grads, ipt, unc, kinds, offs = _problem(1e-39)
    S.fused_sensitivity_update(params, grads, ipt, unc, kinds, offs, torch.zeros(4), 0.85, 0.85)
    assert all(bool((u > 0).all()) for u in unc)


def test_native_matches_reference_with_normal_state():
    out = []
    for native in (True, False):
        params, grads, ipt, unc, kinds, offs = _problem(1e-3)
        scores = torch.zeros(4)
        fn = native_cpu.fused_sensitivity_update if native else sensitivity_update_ref
        fn(params, grads, ipt, unc, kinds, offs, scores, 0.85, 0.85)
        out.append((scores, unc))
    torch.testing.assert_close(out[0][0], out[1][0])
    for u, v in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(u, v)
