"""The allocators under transformers.Trainer (CPU, tiny randomly initialised BERT): the AdaLoRA callback allocates
exactly as a hand-written PEFT-style loop; the ShapLoRA driver runs super-network → scores → retrain with Trainer;
two gloo processes (DDP through Trainer/accelerate) make the same allocations as each other and as one process."""
from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.python_api.spawned import leave_rank, rank_errors

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

N, SEQ, VOCAB, BS, STEPS, R, BUDGET = 16, 8, 40, 8, 8, 4, 6
SPAWN_TIMEOUT_S = 240


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices: a second intra-op thread only spins, and on a loaded machine it slows a step ~100x (measured:
    # the hand-written loop below, 17.5 s wall with 2 threads vs 0.13 s with 1).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Toy(torch.utils.data.Dataset):
    def __init__(self, n=N, seed=0):
        # each class draws its tokens from its own half of the vocabulary: learnable in a few steps
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 2
        half = (VOCAB - 5) // 2
        self.ids = 5 + torch.randint(0, half, (n, SEQ), generator=g) + half * self.labels[:, None]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def _model(seed: int = 0) -> nn.Module:
    import python_api as lk
    # No dropout: the Trainer run and the hand-written loop must see the same forward passes.
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(cfg)
    lk.apply_adapters(model, ["query", "value"], r=R, alpha=2 * R, svd=True, modules_to_save=["classifier"])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():   # SVD-form B starts at zero: give the ranks distinct, non-zero sensitivities
        for m in lk.adapter_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return model


def _args(out: str, steps: int = STEPS, bs: int = BS, lr: float = 1e-2) -> "transformers.TrainingArguments":
    # constant lr, no clipping, sequential order: the hand-written loop below reproduces every optimizer step
    return transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=bs, max_steps=steps,
                                          learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=0.0,
                                          weight_decay=0.0, train_sampling_strategy="sequential", report_to=[],
                                          use_cpu=True, save_strategy="no", logging_strategy="no",
                                          disable_tqdm=True, seed=0)


def _allocator(model):
    import python_api as lk
    return lk.AdaLoRAAllocator(model, total_step=STEPS, tinit=1, tfinal=2, deltaT=1, budget=BUDGET)


def _trainer_adalora(out: str, bs: int = BS, orth_reg: float = 0.0):
    from python_api.allocators.callbacks import adalora_callback
    model = _model()
    alloc = _allocator(model)
    cb = adalora_callback(alloc, orth_reg=orth_reg)
    trainer = transformers.Trainer(model=model, args=_args(out, bs=bs), train_dataset=_Toy(), callbacks=[cb])
    trainer.train()
    cb.trainer = trainer
    return model, alloc, cb


def _hand_adalora(update_after_zero_grad: bool = False):
    model = _model()
    alloc = _allocator(model)
    data = _Toy()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for step in range(STEPS):
        lo = (step * BS) % N
        batch = {k: torch.stack([data[i][k] for i in range(lo, lo + BS)]) for k in data[0]}
        model(**batch).loss.backward()
        opt.step()
        if update_after_zero_grad:
            opt.zero_grad(set_to_none=False)
        alloc.update_and_allocate(step)
        opt.zero_grad()
    return model, alloc


def _lambdas(alloc) -> dict[str, torch.Tensor]:
    return {n: e.detach().clone().reshape(-1) for n, (e, _, _) in alloc.adapters.items()}


# ---- AdaLoRA ----------------------------------------------------------------------------------------------------
def test_adalora_callback_matches_hand_written_loop(tmp_path):
    _, alloc, cb = _trainer_adalora(str(tmp_path))
    _, ref = _hand_adalora()
    assert alloc.rank_pattern == ref.rank_pattern
    assert sum(map(sum, alloc.rank_pattern.values())) == BUDGET
    for n, lam in _lambdas(ref).items():
        torch.testing.assert_close(_lambdas(alloc)[n], lam, rtol=1e-4, atol=1e-6)
    # masked at every step from tinit+1 through the final mask at T − t_f (deltaT = 1)
    assert [s for s, _ in cb.history] == list(range(2, STEPS - 2 + 1))
    # control: sensitivities read after zero_grad see no gradient and allocate differently
    _, blind = _hand_adalora(update_after_zero_grad=True)
    assert blind.rank_pattern != ref.rank_pattern


def test_adalora_callback_orth_reg_changes_training_and_is_removed(tmp_path):
    import python_api as lk
    model, alloc, _ = _trainer_adalora(str(tmp_path / "a"), orth_reg=0.5)
    ref, _ = _hand_adalora()
    a = {n: m.lora_A.detach() for n, m in lk.adapter_layers(model).items()}
    assert any(not torch.allclose(a[n], m.lora_A.detach()) for n, m in lk.adapter_layers(ref).items())
    # the gradient hooks are gone after training: a backward pass now gives the plain gradient
    layer = next(iter(lk.adapter_layers(model).values()))
    assert not layer.lora_A._backward_hooks


def test_adalora_callback_refuses_a_run_too_short_for_the_final_mask(tmp_path):
    from python_api.allocators.callbacks import adalora_callback
    model = _model()
    cb = adalora_callback(_allocator(model))
    tr = transformers.Trainer(model=model, args=_args(str(tmp_path), steps=STEPS - 2), train_dataset=_Toy(),
                              callbacks=[cb])
    with pytest.raises(ValueError, match="total_step"):
        tr.train()


def test_adalora_callback_bad_arguments():
    from python_api.allocators import callbacks
    with pytest.raises(TypeError, match="allocator"):
        callbacks.adalora_callback(object())
    with pytest.raises(ValueError, match="orth_reg"):
        callbacks.adalora_callback(_allocator(_model()), orth_reg=-1.0)
    assert issubclass(callbacks.AdaLoRACallback, transformers.TrainerCallback)


def test_adalora_callback_resumes_its_allocator_from_the_trainer_checkpoint(tmp_path):
    """A run stopped after a checkpoint and resumed with a fresh model, allocator and callback ends with the
    uninterrupted run's masks (the allocator state is saved into each Trainer checkpoint and loaded back)."""
    from python_api.allocators.callbacks import STATE_FILE, adalora_callback
    _, ref, _ = _trainer_adalora(str(tmp_path / "ref"))

    def args(out, steps):   # a checkpoint every 3 steps; the run's schedule is STEPS long either way
        a = _args(out)
        a.save_strategy, a.save_steps, a.max_steps = "steps", 3, steps
        return a
    out = str(tmp_path / "run")
    model = _model()
    cb = adalora_callback(_allocator(model))
    part = transformers.Trainer(model=model, args=args(out, STEPS), train_dataset=_Toy(), callbacks=[cb])
    part.args.max_steps = STEPS
    part.train()
    assert os.path.isfile(os.path.join(out, "checkpoint-6", STATE_FILE))
    fresh = _model(seed=5)
    alloc = _allocator(fresh)
    tr = transformers.Trainer(model=fresh, args=args(out, STEPS), train_dataset=_Toy(),
                              callbacks=[adalora_callback(alloc)])
    tr.train(resume_from_checkpoint=os.path.join(out, "checkpoint-6"))
    assert alloc.rank_pattern == ref.rank_pattern
    assert sum(map(sum, alloc.rank_pattern.values())) == BUDGET
    # without the allocator's file (and with a fresh allocator) the resume is refused, not run with empty state
    os.remove(os.path.join(out, "checkpoint-6", STATE_FILE))
    lost = _model(seed=5)
    tr = transformers.Trainer(model=lost, args=args(out, STEPS), train_dataset=_Toy(),
                              callbacks=[adalora_callback(_allocator(lost))])
    with pytest.raises(ValueError, match="allocator's state is not at"):
        tr.train(resume_from_checkpoint=os.path.join(out, "checkpoint-6"))


def test_adalora_callback_refuses_a_trainer_on_another_model(tmp_path):
    from python_api.allocators.callbacks import adalora_callback
    cb = adalora_callback(_allocator(_model()))
    tr = transformers.Trainer(model=_model(seed=1), args=_args(str(tmp_path)), train_dataset=_Toy(), callbacks=[cb])
    with pytest.raises(ValueError, match="does not hold the allocator's adapters"):
        tr.train()


def test_adalora_callback_orth_reg_once_per_optimizer_step(tmp_path):
    """With gradient accumulation (2 micro-batches of 4), the orthogonality term enters each optimizer step once,
    as in one batch of 8: SGD updates agree."""
    import python_api as lk
    from python_api.allocators.callbacks import adalora_callback

    def run(bs, acc):
        model = _model()
        a = _args(str(tmp_path / f"{bs}-{acc}"), steps=2, bs=bs)
        a.gradient_accumulation_steps, a.optim = acc, "sgd"
        alloc = lk.AdaLoRAAllocator(model, total_step=2, tinit=0, tfinal=1, deltaT=1, budget=2 * 2 * R)
        transformers.Trainer(model=model, args=a, train_dataset=_Toy(n=16),
                             callbacks=[adalora_callback(alloc, orth_reg=5.0)]).train()
        return {n: m.lora_A.detach().clone() for n, m in lk.adapter_layers(model).items()}
    one, two = run(8, 1), run(4, 2)
    for n in one:
        torch.testing.assert_close(two[n], one[n], rtol=1e-4, atol=1e-6)


def test_adalora_callback_infinite_orth_reg_is_refused():
    from python_api.allocators import callbacks
    with pytest.raises(ValueError, match="orth_reg must be finite"):
        callbacks.adalora_callback(_allocator(_model()), orth_reg=float("inf"))


# ---- ShapLoRA ---------------------------------------------------------------------------------------------------
def _loss_fn(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return nn.functional.cross_entropy(logits, batch["labels"], reduction="none")


def _val_batches():
    data = _Toy(n=16, seed=1)
    return [{k: torch.stack([data[i][k] for i in range(lo, lo + 8)]) for k in data[0]} for lo in (0, 8)]


def _shaplora(out: str, bs: int = BS, **kw):
    from python_api.allocators.callbacks import shaplora_with_trainer
    runs = []

    def make_trainer(model):
        runs.append(len(runs))
        return transformers.Trainer(model=model, args=_args(os.path.join(out, str(len(runs))), steps=8, bs=bs,
                                                             lr=1e-1), train_dataset=_Toy())
    return shaplora_with_trainer(lambda: _model(), make_trainer, _val_batches(), loss_fn=_loss_fn, budget=BUDGET,
                                 **kw)


def test_shaplora_with_trainer_runs_the_phases(tmp_path):
    import python_api as lk
    res = _shaplora(str(tmp_path))
    masks, model = res["masks"], res["model"]
    assert sum(int(m.sum()) for m in masks.values()) == BUDGET
    assert len(res["trainers"]) == 2 + res["supernet"]["extra_train_calls"]
    assert res["trainers"][-1].model is model
    assert res["supernet"]["val_loss"] < res["supernet"]["val_loss_untrained"]
    layers = lk.adapter_layers(model)
    # retrained as plain LoRA with the allocated rank pattern
    assert {n: lay.r for n, lay in layers.items()} == {n: int(m.sum()) for n, m in masks.items() if m.any()}
    assert not any(lay.svd for lay in layers.values())
    # it started fresh (plain LoRA: B = 0) and was trained
    assert any(torch.count_nonzero(lay.lora_B) for lay in layers.values())


def test_shaplora_with_trainer_bad_arguments():
    from python_api.allocators.callbacks import shaplora_with_trainer
    with pytest.raises(TypeError, match="make_trainer"):
        shaplora_with_trainer(_model, None, _val_batches(), loss_fn=_loss_fn, budget=BUDGET)
    with pytest.raises(TypeError, match="make_trainer must return"):
        shaplora_with_trainer(_model, lambda m: object(), _val_batches(), loss_fn=_loss_fn, budget=BUDGET)


# ---- two processes ----------------------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    res = {}
    try:
        from python_api.distributed import same_on_all_ranks
        # per-device batch BS/world: the global batch, and so the averaged gradient, is the single process's
        _, alloc, cb = _trainer_adalora(os.path.join(out_dir, f"ada{rank}"), bs=BS // world)
        res["wrapped"] = type(cb.trainer.model_wrapped).__name__
        res["adalora"] = alloc.rank_pattern
        res["adalora_same"] = same_on_all_ranks(alloc.rank_pattern)
        sh = _shaplora(os.path.join(out_dir, f"shap{rank}"), bs=BS // world)
        res["shaplora"] = {n: m.tolist() for n, m in sh["masks"].items()}
        res["shaplora_same"] = same_on_all_ranks(res["shaplora"])
        # the guard before each Trainer run: ranks whose rank patterns differ are refused
        import python_api as lk
        from python_api.allocators.callbacks import _same_masks_everywhere
        odd = _model()
        next(iter(lk.adapter_layers(odd).values())).set_rank_mask([1, 1, 1, rank % 2])
        try:
            _same_masks_everywhere(odd)
            res["guard"] = None
        except RuntimeError as e:
            res["guard"] = str(e)
        res["world"] = dist.get_world_size()
    except Exception:
        res["error"] = traceback.format_exc()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    leave_rank(ok="error" not in res)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo backend")
def test_two_gloo_ranks_allocate_identically_and_as_one_process():
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.spawn(_worker, args=(2, _free_port(), d), nprocs=2, join=False)
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:   # a collective mismatch hangs: fail instead of blocking
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail(f"the 2 ranks did not finish within {SPAWN_TIMEOUT_S} s\n{rank_errors(d, 2)}")
        res = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(2)]
        for r, o in enumerate(res):
            assert "error" not in o, f"rank {r}:\n{o['error']}"
            assert o["world"] == 2 and o["wrapped"] == "DistributedDataParallel"
            assert o["adalora_same"] and o["shaplora_same"]
            assert o["guard"] is not None and "differs between ranks" in o["guard"]
        assert res[0]["adalora"] == res[1]["adalora"]
        assert res[0]["shaplora"] == res[1]["shaplora"]
        _, ref = _hand_adalora()
        assert res[0]["adalora"] == ref.rank_pattern
        single = _shaplora(os.path.join(d, "single"))
        assert res[0]["shaplora"] == {n: m.tolist() for n, m in single["masks"].items()}
