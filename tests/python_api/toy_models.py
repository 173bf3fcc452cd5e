"""Small models for the surgery / ShareLoRA tests: a plain nn.Module transformer and tiny HF models."""
from __future__ import annotations

import copy

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, d_kv: int | None = None):
        super().__init__()
        d_kv = d_kv or d
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d_kv), nn.Linear(d, d_kv)
        self.o_proj = nn.Linear(d_kv, d)

    def forward(self, x):                                  # x [B, S, d]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if k.shape[-1] != q.shape[-1]:
            k, v = k.repeat(1, 1, q.shape[-1] // k.shape[-1]), v.repeat(1, 1, q.shape[-1] // v.shape[-1])
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
        return x + self.o_proj(att @ v)[..., : x.shape[-1]]


class Toy(nn.Module):
    def __init__(self, d: int = 16, layers: int = 3, n_cls: int = 3, d_kv: int | None = None):
        super().__init__()
        self.layers = nn.ModuleList(Block(d, d_kv) for _ in range(layers))
        self.classifier = nn.Linear(d, n_cls)

    def forward(self, x):
        for blk in self.layers:
            x = blk(x)
        return self.classifier(x.mean(1))


def toy(seed: int = 0, dtype=torch.float32, **kw) -> Toy:
    torch.manual_seed(seed)
    return Toy(**kw).to(dtype)


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    """B starts at zero (LoRA init), which hides A's gradient and the adapter's effect: make it random."""
    from python_api.surgery import adapter_layers
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64) * 0.3)


def tie_like(unshared: nn.Module, shared: nn.Module) -> None:
    """Copies every layer's (possibly shared) A and B values of ``shared`` into ``unshared``'s own matrices."""
    from python_api.surgery import adapter_layers
    su = adapter_layers(shared)
    with torch.no_grad():
        for name, layer in adapter_layers(unshared).items():
            layer.lora_A.copy_(su[name].lora_A)
            layer.lora_B.copy_(su[name].lora_B)


def assert_shared_grads_are_sums(shared: nn.Module, unshared: nn.Module, dtype: torch.dtype | None = None) -> None:
    """After backward on both: each (possibly shared) A and B of ``shared`` has a gradient equal to the sum of the
    gradients of the matching per-layer matrices of ``unshared`` (tied by :func:`tie_like`) over its sharers."""
    from python_api.surgery import adapter_layers
    from tests.helpers import assert_close
    S, U = adapter_layers(shared), adapter_layers(unshared)
    for name, layer in S.items():
        for pname in ("lora_A", "lora_B"):
            p = getattr(layer, pname)
            sharers = [n for n in S if getattr(S[n], pname) is p]
            want = sum(getattr(U[n], pname).grad for n in sharers)
            assert p.grad is not None, f"{name}.{pname} has no gradient"
            assert_close(p.grad, want, dtype, name=f"{name}.{pname} ({len(sharers)} sharers)")


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def tiny_bert(layers: int = 2):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertModel(cfg).eval()


def tiny_llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()
