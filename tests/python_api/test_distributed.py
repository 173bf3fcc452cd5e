"""Data parallelism on CPU with gloo, 2 processes (torch.multiprocessing.spawn): DDP and FSDP2 train LoRA,
rank-masked, shared (ShareLoRA, in-place gradients) and MoE-LoRA layers to the single-process losses on the same
global batch; allocators decide identically on every rank and as one process; sharded Shapley scoring equals one
process; checkpoints cross between distributed and single-process runs.

One spawn runs every scenario (process start-up and gloo rendezvous dominate the cost); each test then checks
its scenario's results against the same scenario run in this process with world size 1.
"""
from __future__ import annotations

import os
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.helpers import assert_close
from tests.python_api.spawned import leave_rank, rank_errors

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this build")

WORLD = 2
GLOBAL_B, SEQ, D, STEPS = 8, 4, 16, 3
KINDS = ("lora", "masked", "shared", "moe")
SPAWN_TIMEOUT_S = 300


# ---- models and data (deterministic: every rank and the single process build the same thing) ------------------
def _build(kind: str, svd: bool = False) -> nn.Module:
    from python_api.surgery import apply_adapters
    from tests.python_api.toy_models import randomize_b, toy
    model = toy(0, d=D, layers=2)
    if kind == "moe":
        from python_api.moe import apply_moe_adapters
        # The Switch load-balance loss is a per-batch statistic (a per-rank one under DP): off for equality.
        apply_moe_adapters(model, ["q_proj", "v_proj"], [2, 3], r=2, alpha=4.0)
        for p in model.classifier.parameters():
            p.requires_grad_(True)
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for m in model.modules():
                if hasattr(m, "router"):
                    m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
        return model
    share = "AB" if kind == "shared" else None
    apply_adapters(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8, share=share,
                   share_scope="attention" if share else "module_type", svd=svd, modules_to_save=["classifier"])
    randomize_b(model)
    if svd:
        with torch.no_grad():
            for m in model.modules():
                if getattr(m, "lora_E", None) is not None:
                    m.lora_E.copy_(torch.linspace(0.5, 1.5, m.lora_E.numel()))
    if kind == "masked":
        from python_api.surgery import adapter_layers
        for i, layer in enumerate(adapter_layers(model).values()):
            layer.set_rank_mask([1, i % 2, 1, 0])
    return model


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_B, SEQ, D, generator=g), torch.randint(0, 3, (GLOBAL_B,), generator=g)


def _shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world)[rank]


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: _full(p).clone() for n, p in model.named_parameters() if p.requires_grad}


def _global_mean(loss: torch.Tensor, world: int) -> float:
    loss = loss.detach().clone()
    if world > 1:
        dist.all_reduce(loss)
    return float(loss) / world


# ---- scenarios: each returns a picklable result; world == 1 is the single-process reference ------------------
def train(kind: str, wrap: str | None, rank: int = 0, world: int = 1) -> dict:
    model = _build(kind)
    net = model
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model)
    elif wrap == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for blk in model.layers:
            if kind != "shared":  # a matrix shared across blocks must live in one FSDP group (the root)
                fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for step in range(STEPS):
        x, y = _batch(step)
        opt.zero_grad(set_to_none=True)  # before forward: shared layers create their .grad buffer in forward
        loss = nn.functional.cross_entropy(net(_shard(x, rank, world)), _shard(y, rank, world))
        loss.backward()
        if wrap in ("manual", "manual-unsynced"):
            from python_api.distributed import all_reduce_grads, shared_parameters, sync_shared_grads
            shared = {id(p) for p in shared_parameters(model)}
            all_reduce_grads([p for p in model.parameters() if p.requires_grad and id(p) not in shared])
            if wrap == "manual":
                sync_shared_grads(model)
        opt.step()
        losses.append(_global_mean(loss, world))
    out = {"losses": losses, "params": _trainable(model)}
    if kind == "shared":
        from python_api.surgery import adapter_layers
        layers = list(adapter_layers(model).values())
        # distinct matrices (q/k/v share one A and one B across blocks, o_proj another pair), out of 8 layers
        out["distinct"] = (len({id(m.lora_A) for m in layers}), len({id(m.lora_B) for m in layers}), len(layers))
    return out


def adalora(rank: int = 0, world: int = 1) -> dict:
    """AdaLoRA under DDP: the tracker reads the already-reduced gradients; rank patterns must agree."""
    from python_api.allocators.adalora import AdaLoRAAllocator
    from python_api.distributed import same_on_all_ranks
    model = _build("lora", svd=True)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model)
    alloc = AdaLoRAAllocator(model, target_r=2, total_step=STEPS + 2, tinit=0, tfinal=1, deltaT=1)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    patterns = []
    for step in range(STEPS):
        x, y = _batch(step)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(_shard(x, rank, world)), _shard(y, rank, world)).backward()
        opt.step()
        patterns.append(alloc.update_and_allocate(step))
    return {"patterns": patterns, "scores": alloc.tracker.scores.clone(), "agree": same_on_all_ranks(patterns)}


def shapley(rank: int = 0, world: int = 1) -> dict:
    from python_api.distributed import distributed_shapley_sensitivity, same_on_all_ranks
    model = _build("lora", svd=True)
    x, y = _batch(99)

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1], reduction="none")

    # Uneven shards (3 + 5 examples over two batches on rank 0, ...) exercise the weighting by example count.
    idx = torch.arange(GLOBAL_B).tensor_split([3])[rank] if world > 1 else torch.arange(GLOBAL_B)
    batches = [(x[i], y[i]) for i in idx.split(2)]
    out = {}
    for mode, kw in (("taylor", {"q": 1.0}), ("exact", {})):
        if mode == "exact":
            from python_api.surgery import adapter_layers
            for i, layer in enumerate(adapter_layers(model).values()):  # 2^N evaluations: N = 5 players
                layer.set_rank_mask([1, 0, 0, 0] if i < 4 else ([1, 1, 0, 0] if i == 4 else [0, 0, 0, 0]))
        out[mode] = distributed_shapley_sensitivity(model, batches, mode, loss_fn=loss_fn, **kw)
    out["agree"] = same_on_all_ranks({k: v.tolist() for k, v in out["taylor"].items()})
    return out


def checkpoint(rank: int = 0, world: int = 1, path: str = "") -> dict:
    """Distributed → single: rank 0 of a DDP run saves; single → distributed: every rank loads the file the
    parent saved, wrapped in DDP, and evaluates."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from python_api.checkpoint import load_adapters, save_adapters
    x, _ = _batch(7)
    model = _build("shared")
    net = DDP(model)
    _train_in_place(net, rank, world)
    if rank == 0:
        save_adapters(model, os.path.join(path, "from_ddp"))
    fresh = _build("shared")
    load_adapters(fresh, os.path.join(path, "from_single"))
    with torch.no_grad():
        out = {"ddp_out": net(x), "loaded_out": DDP(fresh)(x)}
    dist.barrier()
    return out


def checkpoint_fsdp(rank: int = 0, world: int = 1, path: str = "") -> dict:
    """FSDP2: the sharded parameters are gathered (``unshard``) and rank 0 saves; the reverse direction loads the
    single-process file before sharding."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from python_api.checkpoint import load_adapters, save_adapters
    mesh = init_device_mesh("cpu", (world,))
    x, _ = _batch(7)
    model = _build("lora")
    for blk in model.layers:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _train_in_place(model, rank, world)
    model.unshard()  # every rank joins the all-gather; rank 0 then holds plain full tensors to write
    for blk in model.layers:
        blk.unshard()
    if rank == 0:
        save_adapters(model, os.path.join(path, "from_fsdp"))
    for blk in model.layers:
        blk.reshard()
    model.reshard()
    fresh = _build("lora")
    load_adapters(fresh, os.path.join(path, "from_single_lora"))
    fully_shard(fresh, mesh=mesh)
    with torch.no_grad():
        out = {"fsdp_out": model(x), "loaded_out": fresh(x)}
    dist.barrier()
    return out


def shared_no_sync(rank: int = 0, world: int = 1) -> dict:
    """ShareLoRA's in-place gradient under DDP ``no_sync`` micro-batches (tests/python_api/test_share_loops.py)."""
    from tests.python_api.test_share_loops import ddp_no_sync_grads
    return ddp_no_sync_grads(rank, world)


# ---- the spawned worker ------------------------------------------------------------------------------------------
def _worker(rank: int, world: int, init_file: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    jobs = [(f"{w}-{k}", train, (k, w)) for w in ("ddp", "fsdp") for k in KINDS]
    jobs += [(f"{w}-shared", train, ("shared", w)) for w in ("manual", "manual-unsynced")]
    jobs += [("adalora", adalora, ()), ("shapley", shapley, ())]
    jobs += [("checkpoint", checkpoint, ()), ("checkpoint-fsdp", checkpoint_fsdp, ())]
    jobs += [("shared-no-sync", shared_no_sync, ())]
    for name, fn, args in jobs:
        t0 = time.perf_counter()
        try:
            kw = {"path": out_dir} if fn in (checkpoint, checkpoint_fsdp) else {}
            results[name] = fn(*args, rank=rank, world=world, **kw)
        except Exception:  # reported by the test of that scenario
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
        results[name]["seconds"] = time.perf_counter() - t0
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    leave_rank()


@pytest.fixture(scope="module")
def spawned():
    with tempfile.TemporaryDirectory() as d:
        # The single → distributed checkpoint direction: saved here before the ranks start.
        from python_api.checkpoint import save_adapters
        ref = _build("shared")
        _train_in_place(ref)
        save_adapters(ref, os.path.join(d, "from_single"))
        ref_lora = _build("lora")
        _train_in_place(ref_lora)
        save_adapters(ref_lora, os.path.join(d, "from_single_lora"))
        ctx = mp.spawn(_worker, args=(WORLD, os.path.join(d, "init"), d), nprocs=WORLD, join=False)
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:  # a collective mismatch hangs: fail instead of blocking CI
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail(f"the {WORLD} spawned ranks did not finish within {SPAWN_TIMEOUT_S} s\n"
                            f"{rank_errors(d, WORLD)}")
        res = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
        print("seconds per scenario (rank 0):", {k: round(v["seconds"], 2) for k, v in res[0].items()})
        from python_api.checkpoint import load_adapters
        single = _build("shared")
        load_adapters(single, os.path.join(d, "from_ddp"))
        x, _ = _batch(7)
        single_lora = _build("lora")
        load_adapters(single_lora, os.path.join(d, "from_fsdp"))
        with torch.no_grad():
            outs = {"ranks": res, "single_from_ddp": single(x), "single_saved": ref(x),
                    "single_from_fsdp": single_lora(x), "single_saved_lora": ref_lora(x)}
        yield outs


def _train_in_place(model: nn.Module, rank: int = 0, world: int = 1) -> None:
    """STEPS of SGD on this rank's shard of each batch (the whole batch when world is 1)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(STEPS):
        x, y = _batch(step)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(_shard(x, rank, world)), _shard(y, rank, world)).backward()
        opt.step()


def _get(spawned, name):
    out = [r[name] for r in spawned["ranks"]]
    for r, o in enumerate(out):
        assert "error" not in o, f"rank {r}, scenario {name}:\n{o['error']}"
    return out


# ---- tests -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", KINDS)
def test_data_parallel_matches_single_process(spawned, wrap, kind):
    ref = train(kind, None)
    for r, out in enumerate(_get(spawned, f"{wrap}-{kind}")):
        for step, (got, exp) in enumerate(zip(out["losses"], ref["losses"])):
            assert_close(torch.tensor(got), torch.tensor(exp, dtype=torch.float64), torch.float32,
                         f"rank {r} loss at step {step}")
        assert out["params"].keys() == ref["params"].keys()
        for n, p in out["params"].items():
            assert_close(p, ref["params"][n].double(), torch.float32, f"rank {r} {n} after {STEPS} steps")
        if kind == "shared":
            assert out["distinct"] == ref["distinct"] == (2, 2, 8), "a shared matrix stopped being one Parameter"
    # Training moved the adapters (a test that trains nothing would pass trivially).
    assert ref["losses"][0] != ref["losses"][-1]


def test_adalora_decisions_identical_across_ranks_and_single_process(spawned):
    ref = adalora()
    outs = _get(spawned, "adalora")
    assert any(p is not None for p in ref["patterns"]), "the schedule masked nothing: the test would be vacuous"
    for r, out in enumerate(outs):
        assert out["agree"]
        assert out["patterns"] == ref["patterns"], f"rank {r} allocated differently from one process"
        assert_close(out["scores"], ref["scores"].double(), torch.float32, f"rank {r} sensitivity scores")


def test_sharded_shapley_equals_single_process(spawned):
    ref = shapley()
    for r, out in enumerate(_get(spawned, "shapley")):
        assert out["agree"]
        for mode in ("taylor", "exact"):
            assert out[mode].keys() == ref[mode].keys()
            for n, v in out[mode].items():
                nan = torch.isnan(ref[mode][n])
                assert torch.equal(torch.isnan(v), nan), f"{mode} {n}: masked ranks differ"
                assert_close(v[~nan], ref[mode][n][~nan], torch.float32, f"rank {r} {mode} φ {n}")


def test_checkpoints_cross_between_distributed_and_single_process(spawned):
    outs = _get(spawned, "checkpoint")
    for r, out in enumerate(outs):
        # saved by rank 0 of the DDP run → loaded in this process: identical outputs
        assert torch.equal(spawned["single_from_ddp"], out["ddp_out"]), f"rank {r}"
        # saved by this process → loaded by every rank under DDP: identical outputs
        assert torch.equal(out["loaded_out"], spawned["single_saved"]), f"rank {r}"


def test_fsdp2_checkpoints_cross_between_sharded_and_single_process(spawned):
    for r, out in enumerate(_get(spawned, "checkpoint-fsdp")):
        assert torch.equal(spawned["single_from_fsdp"], out["fsdp_out"]), f"rank {r}"
        assert torch.equal(out["loaded_out"], spawned["single_saved_lora"]), f"rank {r}"


def test_manual_data_parallel_needs_sync_shared_grads(spawned):
    """Without a DDP/FSDP wrapper nothing reduces the in-place shared gradients: sync_shared_grads does it, and
    leaving it out (the control) makes the shared matrices diverge from one process."""
    ref = train("shared", None)
    for r, out in enumerate(_get(spawned, "manual-shared")):
        for n, p in out["params"].items():
            assert_close(p, ref["params"][n].double(), torch.float32, f"rank {r} {n}")
    unsynced = _get(spawned, "manual-unsynced-shared")[0]["params"]
    diverged = [n for n, p in unsynced.items() if not torch.allclose(p, ref["params"][n], atol=1e-4, rtol=1e-4)]
    assert {"layers.0.q_proj.lora_A", "layers.0.q_proj.lora_B"} <= set(diverged), diverged


def test_ddp_no_sync_accumulates_shared_gradient(spawned):
    from tests.python_api.test_share_loops import check_ddp_no_sync
    check_ddp_no_sync(_get(spawned, "shared-no-sync"), WORLD)
