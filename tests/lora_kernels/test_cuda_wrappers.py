"""CPU-checkable parts of the CUDA backend wrappers: refusals with reasons, argument validation that names
the argument, the dropout hash of the compiled module against the reference, and lean imports."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lora_kernels.compiled import cuda_module
from lora_kernels.gated_lora import cuda as cuda_gated
from lora_kernels.gated_lora import reference
from lora_kernels.sensitivity import cuda as cuda_sensitivity
from lora_kernels.dispatch import Problem

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # constructing a device object needs no GPU


def _module_or_skip():
    mod, err = cuda_module.load()
    if mod is None:
        pytest.skip(f"compiled CUDA module not loadable here: {err}")
    return mod


# ---------------------------------------------------------------- supports()
@pytest.mark.parametrize("problem, words", [
    (Problem("gated_lora", CPU, torch.float32, 4), "CUDA tensors"),
    (Problem("gated_lora", CUDA, torch.float64, 4), "float64"),
    (Problem("gated_lora", CUDA, torch.float16, 65), "Triton backend"),
    (Problem("sensitivity", CUDA, torch.float16, 4), "gated_lora"),
])
def test_gated_supports_refuses_with_reason(problem, words):
    ok, why = cuda_gated.supports(problem)
    assert not ok and words in why


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gate_kind", ["none", "rank", "token"])
def test_gated_supports_accepts_decode_shapes(dtype, gate_kind):
    ok, why = cuda_gated.supports(Problem("gated_lora", CUDA, dtype, 64, gate_kind, True))
    assert ok, why


def test_sensitivity_supports():
    ok, why = cuda_sensitivity.supports(Problem("sensitivity", CPU, torch.float32))
    assert not ok and "CUDA tensors" in why
    assert cuda_sensitivity.supports(Problem("sensitivity", CUDA, torch.bfloat16))[0]


# ---------------------------------------------------------------- argument validation happens at the op boundary
# The backends assume valid input (lora_kernels.gated_lora.op / lora_kernels.sensitivity.op validate once); these
# are the mistakes the CUDA wrappers used to catch themselves, now caught before any backend is chosen.
def _gated_args(T=3, K=10, N=7, R=4, dtype=torch.float32):
    return {"x": torch.randn(T, K, dtype=dtype), "weight": torch.randn(N, K, dtype=dtype), "bias": None,
            "lora_a": torch.randn(R, K), "lora_b": torch.randn(N, R), "scale": 0.5, "gate": None, "dropout_p": 0.0}


@pytest.mark.parametrize("change, exc, words", [
    ({"lora_b": torch.randn(7, 5)}, ValueError, "lora_b must be [N, R]"),
    ({"gate": torch.ones(5)}, ValueError, "gate"),
    ({"dropout_p": 1.0}, ValueError, "dropout_p"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"seed": 2**70}, ValueError, "seed"),
    ({"accum_a": torch.zeros(4, 10, dtype=torch.float16)}, TypeError, "accum_a must be an fp32"),
    ({"accum_b": torch.zeros(4, 7)}, ValueError, "accum_b must have the shape of its matrix [7, 4]"),
])
def test_op_validation_names_the_argument(change, exc, words):
    from lora_kernels.gated_lora import lora_linear
    with pytest.raises(exc) as info:
        lora_linear(**{**_gated_args(), **change})
    assert words in str(info.value)


def _sens_args(R=4, K=6, N=5, dtype=torch.float32):
    params = [torch.randn(R, dtype=dtype), torch.randn(R, K, dtype=dtype), torch.randn(N, R, dtype=dtype)]
    return {"params": params, "grads": [torch.randn_like(p) for p in params],
            "ipt": [torch.zeros(p.shape) for p in params], "unc": [torch.zeros(p.shape) for p in params],
            "kinds": [0, 1, 2], "score_offsets": [0, 0, 0], "scores": torch.zeros(R), "beta1": 0.85, "beta2": 0.85}


@pytest.mark.parametrize("edit, words", [
    (lambda a: a["grads"].pop(), "grads has 2 entries but params has 3"),
    (lambda a: a["kinds"].__setitem__(1, 3), "kinds[1] must be 0"),
    (lambda a: a["grads"].__setitem__(2, torch.randn(4, 5)), "grads[2] has shape (4, 5) but params[2] has (5, 4)"),
    (lambda a: a["ipt"].__setitem__(1, torch.zeros(6, 4).t()), "ipt[1] must be contiguous"),
    (lambda a: a["unc"].__setitem__(0, torch.zeros(4, dtype=torch.float16)), "unc[0] must be float32"),
    (lambda a: a["score_offsets"].__setitem__(2, 1), "score_offsets[2]=1"),
    (lambda a: a["kinds"].__setitem__(0, 1), "params[0] (kind 1) must have 2 dims"),
    (lambda a: a.__setitem__("beta2", 1.0), "beta2 must be in [0, 1)"),
    (lambda a: a.__setitem__("scores", torch.zeros(4, dtype=torch.float64)), "scores must be a 1-D float32 tensor"),
])
def test_sensitivity_validation_names_the_argument(edit, words):
    from lora_kernels.sensitivity import fused_sensitivity_update
    args = _sens_args()
    edit(args)
    with pytest.raises((ValueError, TypeError)) as info:
        fused_sensitivity_update(**args)
    assert words in str(info.value)


def test_sensitivity_ranks_and_row_lengths():
    args = _sens_args()
    assert [cuda_sensitivity._ranks_and_row_len(p, k) for p, k in zip(args["params"], args["kinds"])] == \
        [(4, 1), (4, 6), (4, 4)]


# ---------------------------------------------------------------- the compiled module, where it loads
def test_available_backends_reports_no_cuda_device():
    _module_or_skip()
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    import lora_kernels
    info = lora_kernels.available_backends()["cuda"]
    assert info["usable"] is False and "no CUDA device" in info["reason"]


@pytest.mark.parametrize("seed", [0, 12345, 2**31 + 7, 2**32 - 1])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_kernel_dropout_hash_matches_reference(seed, p):
    mod = _module_or_skip()
    T, K = 37, 301
    got = torch.frombuffer(bytearray(mod.dropout_keep_host(seed & 0xFFFFFFFF, T, K, reference.dropout_threshold(p))),
                           dtype=torch.uint8).view(T, K).bool()
    want = reference.dropout_keep(seed, torch.arange(T).unsqueeze(1), torch.arange(K).unsqueeze(0), p)
    assert torch.equal(got, want), f"{int((got != want).sum())} of {T * K} keep decisions differ"


def test_wrapper_dtype_codes_match_module():
    mod = _module_or_skip()
    codes = {torch.float32: mod.DTYPE_F32, torch.float16: mod.DTYPE_F16, torch.bfloat16: mod.DTYPE_BF16}
    assert cuda_gated.KERNEL_DTYPES == codes == cuda_sensitivity.KERNEL_DTYPES  # all from lora_kernels.codes


def test_importing_wrappers_loads_nothing_compiled():
    code = ("import sys, lora_kernels.gated_lora.cuda, lora_kernels.sensitivity.cuda; "
            "assert 'lora_kernels._lora_kernels_cuda' not in sys.modules, 'compiled module loaded at import'; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "import torch; assert not torch.cuda.is_initialized()")
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------- on a GPU: kernels against the reference
def _gpu_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the kernels themselves run only on a GPU")
    _module_or_skip()


def _f64(*ts):
    return [t.double() if t is not None else None for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gate_kind", ["none", "rank", "token"])
@pytest.mark.parametrize("T, K, N, R, p, noncontig", [(1, 64, 48, 8, 0.0, False), (5, 37, 19, 3, 0.3, True),
                                                      (64, 520, 130, 16, 0.1, False), (3, 16, 8, 1, 0.0, True)])
def test_gpu_gated_matches_reference(dtype, gate_kind, T, K, N, R, p, noncontig):
    from tests.helpers import assert_close, randn
    _gpu_or_skip()
    dev = "cuda"
    x = randn(T, K, dtype=dtype, device=dev, noncontiguous=noncontig)
    w, bias = randn(N, K, dtype=dtype, device=dev, scale=0.1), randn(N, dtype=dtype, device=dev)
    a, b = randn(R, K, device=dev, scale=0.2), randn(N, R, device=dev, scale=0.2)  # fp32 master adapters
    gate = {"none": None, "rank": randn(R, device=dev), "token": randn(T, R, device=dev)}[gate_kind]
    y, h = cuda_gated.gated_lora_forward(x, w, bias, a, b, 0.7, gate, p, 1234)
    y_ref, h_ref = reference.gated_lora_forward(*_f64(x, w, bias, a, b), 0.7, *_f64(gate), p, 1234)
    assert_close(y, y_ref, dtype, "y")
    assert_close(h, h_ref, dtype, "h")
    dy = randn(T, N, dtype=dtype, device=dev)
    got = cuda_gated.gated_lora_backward(dy, x, w, a, b, h, 0.7, gate, p, 1234)
    want = reference.gated_lora_backward(*_f64(dy, x, w, a, b, h_ref), 0.7, *_f64(gate), p, 1234)
    for name, g, r in zip(("dx", "dA", "dB", "dG"), got, want):
        if r is None:
            assert g is None, name
        else:
            assert_close(g, r, dtype, name)
    acc_a, acc_b = torch.ones(R, K, device=dev), torch.ones(N, R, device=dev)
    none = cuda_gated.gated_lora_backward(dy, x, w, a, b, h, 0.7, gate, p, 1234, (False, True, True, False),
                                          accum_a=acc_a, accum_b=acc_b)
    assert none == (None, None, None, None)
    assert_close(acc_a - 1, want[1], dtype, "accum_a")
    assert_close(acc_b - 1, want[2], dtype, "accum_b")


def test_gpu_gated_empty_batch():
    _gpu_or_skip()
    x, w = torch.zeros(0, 8, device="cuda"), torch.randn(4, 8, device="cuda")
    y, h = cuda_gated.gated_lora_forward(x, w, None, torch.randn(2, 8, device="cuda"), torch.randn(4, 2, device="cuda"),
                                         1.0)
    assert y.shape == (0, 4) and h.shape == (0, 2)


def _sens_ref(params, grads, ipt, unc, kinds, offs, scores, b1, b2):
    scores = scores.double().clone()
    new_ipt, new_unc = [], []
    for p, g, i, u, kind, off in zip(params, grads, ipt, unc, kinds, offs):
        imp = (p.double() * g.double()).abs()
        i2 = b1 * i.double() + (1 - b1) * imp
        u2 = b2 * u.double() + (1 - b2) * (imp - i2).abs()
        s = i2 * u2
        s = s if kind == 0 else (s.mean(1) if kind == 1 else s.mean(0))
        scores[off:off + s.numel()] += s
        new_ipt.append(i2)
        new_unc.append(u2)
    return new_ipt, new_unc, scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_sensitivity_matches_reference(dtype):
    from tests.helpers import assert_close, randn
    _gpu_or_skip()
    dev, shapes = "cuda", [(8, 300, 70), (3, 5000, 9), (1, 1, 1), (300, 64, 5000)]  # (R, K, N): K, N cross chunks
    params, kinds, offs, off = [], [], [], 0
    for R, K, N in shapes:
        params += [randn(R, dtype=dtype, device=dev), randn(R, K, dtype=dtype, device=dev),
                   randn(N, R, dtype=dtype, device=dev)]
        kinds += [0, 1, 2]
        offs += [off] * 3
        off += R
    grads = [randn(*p.shape, dtype=dtype, device=dev) for p in params]
    ipt = [torch.rand(p.shape, device=dev) for p in params]
    unc = [torch.rand(p.shape, device=dev) for p in params]
    scores = torch.zeros(off, device=dev)
    want_i, want_u, want_s = _sens_ref(params, grads, ipt, unc, kinds, offs, scores, 0.85, 0.8)
    flag = cuda_sensitivity.fused_sensitivity_update(params, grads, ipt, unc, kinds, offs, scores, 0.85, 0.8)
    assert flag.device.type == "cuda" and flag.dim() == 0 and not bool(flag)
    for j in range(len(params)):
        assert_close(ipt[j], want_i[j], torch.float32, f"ipt[{j}]")
        assert_close(unc[j], want_u[j], torch.float32, f"unc[{j}]")
    assert_close(scores, want_s, torch.float32, "scores")
    # A non-finite gradient anywhere leaves every state untouched and reports it.
    grads[4].view(-1)[7] = float("nan")
    before = [t.clone() for t in ipt + unc] + [scores.clone()]
    flag = cuda_sensitivity.fused_sensitivity_update(params, grads, ipt, unc, kinds, offs, scores, 0.85, 0.8)
    assert bool(flag)
    for t0, t1 in zip(before, ipt + unc + [scores]):
        assert torch.equal(t0, t1)
