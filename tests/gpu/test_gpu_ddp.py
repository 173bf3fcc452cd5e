"""One-GPU DDP smoke test (nccl, world size 1): an adapted model (LoRA, ShareA, MoE) trains under DDP on the GPU
with the same losses as without DDP. Skipped without CUDA; run by bench/gpu_suite.sh."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _losses(kind: str, ddp: bool) -> list[float]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.python_api.test_distributed import _build
    torch.manual_seed(0)
    model = _build(kind).cuda()
    net = DDP(model, device_ids=[0]) if ddp else model
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(4):
        x = torch.randn(8, 4, 16, generator=g).cuda()               # [B, S, d] like the CPU DDP tests
        opt.zero_grad(set_to_none=True)
        loss = net(x).float().square().mean()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


@pytest.mark.parametrize("kind", ["lora", "shared", "moe"])
def test_one_gpu_ddp_matches_plain(kind):
    if not dist.is_nccl_available():
        pytest.skip("nccl not available")
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(d, 'init')}", rank=0, world_size=1)
        try:
            got = _losses(kind, ddp=True)
        finally:
            dist.destroy_process_group()
    ref = _losses(kind, ddp=False)
    assert torch.allclose(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-5), (got, ref)
