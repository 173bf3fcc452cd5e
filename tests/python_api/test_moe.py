"""MoELoRALinear against a dense per-expert float64 reference (values and gradients, router included)."""
import pytest
import torch
from torch import nn

from lora_kernels.gated_lora.reference import dropout_mask
from python_api import MoELoRALinear
from lora_kernels.gated_lora import new_dropout_seed
from python_api.moe import apply_moe_adapters, moe_aux_loss
from tests.helpers import assert_close, randn


def dense_reference(layer, x, seed=None):
    """Loop over experts: y = W0x + b + Σ_e w_e · s · B_e A_e dropout(x), routing in fp32 with top-k renorm."""
    E, r = layer.num_experts, layer.r
    x2 = x.reshape(-1, layer.in_features)
    p = torch.softmax(x2.float() @ layer.router.t(), -1)
    val, idx = p.topk(layer.top_k, -1)
    w = torch.zeros_like(p).scatter(1, idx, val / val.sum(-1, keepdim=True))
    xd = x2
    if seed is not None and layer.dropout > 0:
        xd = x2 * dropout_mask(seed, x2.shape[0], x2.shape[1], layer.dropout, x2.device, x2.dtype)
    dt = x.dtype
    y = x2 @ layer.weight.to(dt).t() + (layer.bias.to(dt) if layer.bias is not None else 0)
    for e in range(E):
        a, b = layer.lora_A[e * r:(e + 1) * r].to(dt), layer.lora_B[:, e * r:(e + 1) * r].to(dt)
        y = y + w[:, e:e + 1].to(x.dtype) * layer.scaling * ((xd @ a.t()) @ b.t())
    return y.reshape(*x.shape[:-1], layer.out_features)


def make(E, r, top_k, dropout=0.0, K=13, N=11, dtype=torch.float64):
    torch.manual_seed(E * 100 + r)
    layer = MoELoRALinear.from_linear(nn.Linear(K, N, dtype=dtype), E, r, alpha=16.0, dropout=dropout, top_k=top_k)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.normal_()
    return layer


def grads(layer, x, fn):
    x = x.detach().requires_grad_(True)
    params = [x, layer.lora_A, layer.lora_B, layer.router]
    for p in params[1:]:
        p.grad = None
    y = fn(x)
    dy = randn(*y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
    g = torch.autograd.grad(y, params, dy)
    return y.detach(), g


@pytest.mark.parametrize("E,top_k", [(1, 1), (4, 1), (4, 2), (5, 5), (7, 2), (3, 3)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_values_and_gradients_match_dense_reference(E, top_k, dropout):
    layer = make(E, 3, top_k, dropout)
    x = randn(2, 9, 13, dtype=torch.float64, noncontiguous=True)
    torch.manual_seed(7)
    y, g = grads(layer, x, layer)
    torch.manual_seed(7)
    seed = new_dropout_seed() if dropout > 0 else None
    y_ref, g_ref = grads(layer, x, lambda xx: dense_reference(layer, xx, seed))
    assert_close(y, y_ref, torch.float64, "y")
    for name, a, b in zip(("dx", "dA", "dB", "drouter"), g, g_ref):
        # The router runs in fp32 by design, so its gradient and the part of dx flowing through it are fp32.
        assert_close(a, b, torch.float32 if name in ("dx", "drouter") else torch.float64, name)


def test_gradcheck_float64():
    layer = make(3, 2, 2, K=6, N=5)
    layer.router.data = layer.router.data.double()     # gradcheck needs fp64 everywhere
    x = randn(4, 6, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda xx, a, b, rt: layer(xx), (x, layer.lora_A, layer.lora_B, layer.router))


def test_all_tokens_routed_to_one_expert():
    layer = make(5, 2, 1, dtype=torch.float32)
    with torch.no_grad():
        layer.router.zero_()
        layer.router[3] = 5.0
    x = randn(16, 13).abs() + 0.1                       # x·router[3] > 0 for every token → expert 3
    y, g = grads(layer, x, layer)
    _, g_ref = grads(layer, x, lambda xx: dense_reference(layer, xx))
    dA, dB = g[1], g[2]
    others = [e for e in range(5) if e != 3]
    assert all(float(dA[e * 2:(e + 1) * 2].abs().max()) == 0 for e in others)
    assert all(float(dB[:, e * 2:(e + 1) * 2].abs().max()) == 0 for e in others)
    assert float(dA[6:8].abs().max()) > 0
    for a, b in zip(g, g_ref):
        assert_close(a, b, torch.float32)


def test_bf16_input_and_empty_batch():
    layer = make(3, 4, 2, dtype=torch.bfloat16)
    x = randn(5, 13, dtype=torch.bfloat16)
    assert layer.router.dtype == torch.float32 and layer.lora_A.dtype == torch.float32
    assert_close(layer(x), dense_reference(layer, x.double()).to(torch.float64), torch.bfloat16)
    assert layer(x[:0]).shape == (0, 11)


def test_load_balance_loss():
    layer = make(4, 2, 2, dtype=torch.float32)
    layer.load_balance_coef = 0.001
    with torch.no_grad():
        layer.router.zero_()                            # uniform p: aux = coef · E · Σ_e f_e / E = coef · k
    layer(randn(10, 13))
    assert layer.aux_loss.item() == pytest.approx(0.001 * 2)
    layer.router.data.normal_()
    x = randn(10, 13)
    layer(x)
    _, p, idx = layer.routing(x)
    f = torch.zeros_like(p).scatter_add_(1, idx, torch.ones_like(p[:, :2])).mean(0)
    assert layer.aux_loss.item() == pytest.approx(0.001 * 4 * float((f * p.mean(0)).sum()), rel=1e-5)
    layer.aux_loss.backward()
    assert layer.router.grad is not None and float(layer.router.grad.abs().sum()) > 0
    layer.eval()
    layer(x)
    assert layer.aux_loss is None


def test_bad_arguments():
    lin = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="top_k"):
        MoELoRALinear.from_linear(lin, 3, 2, top_k=4)
    with pytest.raises(ValueError, match="num_experts"):
        MoELoRALinear.from_linear(lin, 0, 2)
    with pytest.raises(TypeError, match="linear"):
        MoELoRALinear.from_linear(nn.Conv1d(2, 2, 1), 2, 2)
    assert MoELoRALinear.from_linear(lin, 1, 2).top_k == 1 and MoELoRALinear.from_linear(lin, 3, 2).top_k == 2


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.value, self.dense = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 12)

    def forward(self, x):
        return self.dense(self.query(x) + self.value(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([Block() for _ in range(3)])

    def forward(self, x):
        for b in self.layer:
            x = b(x)
        return x


def test_apply_moe_adapters():
    net = Net()
    x = randn(2, 5, 12)
    y0 = net(x)
    new = apply_moe_adapters(net, ["query", "value"], [2, 0, 5], r=4, alpha=8, dropout=0.1,
                             load_balance_coef=0.001)
    assert set(new) == {"layer.0.query", "layer.0.value", "layer.2.query", "layer.2.value"}
    assert isinstance(net.layer[2].query, MoELoRALinear) and net.layer[2].query.num_experts == 5
    assert net.layer[2].query.top_k == 2 and isinstance(net.layer[1].query, nn.Linear)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{p}" for m in new for p in ("router", "lora_A", "lora_B")}
    net.eval()
    assert_close(net(x), y0, torch.float32)             # B = 0 at init: the model is unchanged
    net.train()
    net(x).sum().backward()
    assert moe_aux_loss(net) is not None
    with pytest.raises(ValueError, match="experts_per_layer"):
        apply_moe_adapters(Net(), ["query"], [1, 1], r=2, alpha=4)
    net2 = Net()
    apply_moe_adapters(net2, ["dense"], {0: 3, 1: 1, 2: 2}, r=2, alpha=4, top_k=1)
    assert net2.layer[0].dense.top_k == 1
