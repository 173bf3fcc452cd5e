"""GPU-only checks (skipped on CPU machines): the Triton and CUDA backends against the float64 oracle on a
real device, every gate kind and dtype, decode (T ≤ 64) and prefill shapes. Run by bench/gpu_suite.sh."""
import pytest
import torch

import python_api
from lora_kernels.gated_lora import reference
from tests.helpers import assert_close, randn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _case(T, K, N, R, dtype, gate_kind, gen):
    dev = "cuda"
    x = randn(T, K, dtype=dtype, generator=gen).to(dev)
    w = randn(N, K, dtype=dtype, generator=gen, scale=K ** -0.5).to(dev)
    b = randn(N, dtype=dtype, generator=gen).to(dev)
    a = randn(R, K, dtype=torch.float32, generator=gen, scale=K ** -0.5).to(dev)
    bb = randn(N, R, dtype=torch.float32, generator=gen).to(dev)
    g = {"none": None, "rank": randn(R, generator=gen).to(dev), "token": randn(T, R, generator=gen).to(dev)}[gate_kind]
    return x, w, b, a, bb, g


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("gate_kind", ["none", "rank", "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 7, 64, 333])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_backend_matches_oracle(monkeypatch, backend, gate_kind, dtype, T, p):
    import lora_kernels
    info = lora_kernels.available_backends()[backend]
    if not info["usable"]:
        pytest.skip(info["reason"])
    if backend == "cuda" and T > 64:
        pytest.skip("CUDA backend covers decode shapes (T <= 64)")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", backend)
    gen = torch.Generator().manual_seed(T * 7 + len(gate_kind))
    K, N, R = 200, 136, 16
    x, w, b, a, bb, g = _case(T, K, N, R, dtype, gate_kind, gen)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, bb)]
    gl = g.clone().requires_grad_(True) if g is not None else None
    y = python_api.lora_linear(leaves[0], w, b, leaves[1], leaves[2], 0.5, gl, dropout_p=p, seed=77)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = [t.detach().double().requires_grad_(True) for t in (x, a, bb)]
    gr = g.detach().double().requires_grad_(True) if g is not None else None
    y_ref = reference.lora_linear_ref(ref[0], w.double(), b.double(), ref[1], ref[2], 0.5, gr, p, 77)
    y_ref.backward(dy.double())
    assert_close(y, y_ref, dtype, "y")
    assert_close(leaves[0].grad, ref[0].grad, dtype, "dx")
    assert_close(leaves[1].grad, ref[1].grad, dtype, "dA")
    assert_close(leaves[2].grad, ref[2].grad, dtype, "dB")
    if gl is not None:
        assert_close(gl.grad, gr.grad, dtype, "dG")


def test_layer_training_step_on_gpu():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 256).cuda().to(torch.bfloat16)
    layer = python_api.LoRALinear.from_linear(lin, 16, 32)
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-3)
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    losses = []
    for _ in range(5):
        loss = layer(x).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
