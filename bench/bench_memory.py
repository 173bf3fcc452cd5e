"""Training memory per method on one model: trainable parameters, optimizer state, gradients and the peak
allocator bytes of one training step (MiniLM-L6 sequence classifier, the bench_accuracy FULL configuration).

    python -m bench.bench_memory [--quick]          # writes bench/results/memory_cpu{,_quick}.{json,csv}

Batch: the first ``batch`` Rotten Tomatoes training texts (bench_accuracy's split) padded / truncated to exactly
``seq`` tokens; AdamW (torch defaults, weight_decay 0), fp32, train mode (the encoder's dropout on).
Per method, rows (unit in brackets):
- ``trainable_params`` [params]: numel of the parameters that require grad, a shared matrix counted once;
- ``effective_params`` [params]: what bench_accuracy reports (active ranks only; AdaLoRA at its final budget);
- ``optimizer_state`` [bytes]: tensors in ``optimizer.state`` after a step, AdamW's 0-dim step counters left out;
- ``grad_bytes`` [bytes]: ``.grad`` storages after backward;
- ``allocator_state`` [bytes] (AdaLoRA, PEFT AdaLoRA): the rank allocator's own tensors (sensitivity EMAs);
- ``peak_step_bytes`` [bytes]: :func:`bench.harness.peak_alloc_bytes` over the SECOND training step (after
  ``zero_grad(set_to_none=True)``): forward + backward + optimizer step (+ the allocator's update);
- ``peak_train_bytes`` [bytes]: bytes live before that step (unique storages of the model's parameters and
  buffers, the optimizer state and the allocator state) + ``peak_step_bytes``;
- ``shapley_pass_peak`` [bytes] (ShapLoRA): one Taylor-Shapley scoring pass over ``val_batches`` validation
  batches on the r_init super-network (after two training steps), peak above the live model.
The ``shaplora`` method is the retrain model: SVD form at r_init with the rank masks that pass allocated.
Only PyTorch's CPU allocator is seen (not oneDNN scratch or Python objects); the counts are exact.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


from bench.bench_accuracy import (FULL, Task, _adalora_effective, _effective_params, _svd_model,
                                  adalora_schedule, moe_experts, peft_adalora_model, peft_lora_model, per_example_loss)
from bench.harness import format_table, make_row, peak_alloc_bytes, pin_threads, write_results

METHODS = ["head_only", "peft_lora", "lora", "peft_adalora", "adalora", "shaplora", "shareA", "shareB", "shareAB",
           "moe_uniform", "alphalora"]
QUICK_METHODS = ["head_only", "peft_lora", "lora", "shareA", "shareAB", "moe_uniform"]
SHAPES = {False: {"batch": 16, "seq": 64, "val_batches": 2}, True: {"batch": 2, "seq": 16, "val_batches": 1}}


class _Task(Task):
    """bench_accuracy's Task (``fresh``, ``cfg``, ``targets``, ...) without tokenising the whole data set."""

    def __init__(self, cfg: dict):
        from python_api.app.models import head_modules, load_model
        self.cfg = cfg
        self.base, self.tokenizer, self.targets = load_model("minilm", seed=0)
        self.heads = head_modules(self.base)
        self.num_layers = self.base.config.num_hidden_layers


@dataclass
class Built:
    model: torch.nn.Module
    effective: int
    after_step: Callable[[int], object] | None = None   # the rank allocator's update, called after opt.step()
    state: list = field(default_factory=list)            # objects holding allocator tensors
    moe: bool = False
    extra: dict = field(default_factory=dict)


def _batches(tokenizer, texts: list[str], labels: torch.Tensor, batch: int, seq: int) -> list[dict]:
    enc = tokenizer(texts, truncation=True, max_length=seq, padding="max_length", return_tensors="pt")
    return [{"input_ids": enc["input_ids"][i:i + batch], "attention_mask": enc["attention_mask"][i:i + batch],
             "labels": labels[i:i + batch]} for i in range(0, len(texts), batch)]


def _tensors(obj, depth: int = 3) -> list[torch.Tensor]:
    """Tensors reachable from ``obj`` through attributes, dicts, lists and tuples (``depth`` levels)."""
    if torch.is_tensor(obj):
        return [obj]
    if depth == 0 or isinstance(obj, (str, bytes, int, float, torch.nn.Module)) or obj is None:
        return []
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return []
    return [t for it in items for t in _tensors(it, depth - 1)]


def storage_bytes(tensors, exclude=()) -> int:
    """Bytes of the distinct storages behind ``tensors`` (by data pointer), leaving out those of ``exclude``."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in skip and s.nbytes():
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)   # parameters() yields each once


def _head_only(task) -> Built:
    model = task.fresh(0)
    for p in model.parameters():
        p.requires_grad_(False)
    for h in task.heads:
        for p in model.get_submodule(h).parameters():
            p.requires_grad_(True)
    return Built(model, _trainable(model))


def _lora(task, share=None) -> Built:
    from python_api.surgery import apply_adapters
    cfg = task.cfg
    model = apply_adapters(task.fresh(0), task.targets, r=cfg["r"], alpha=2 * cfg["r"], share=share,
                           modules_to_save=task.heads)
    return Built(model, _effective_params(model))


def _peft_lora(task) -> Built:
    model = peft_lora_model(task, 0)
    return Built(model, _trainable(model))


def _adalora(task) -> Built:
    from python_api.allocators.adalora import AdaLoRAAllocator
    from python_api.surgery import adapter_layers
    cfg = task.cfg
    model = _svd_model(task, 0)
    alloc = AdaLoRAAllocator(model, target_r=cfg["r"], **adalora_schedule(cfg))
    final = {n: cfg["r"] for n in adapter_layers(model)}   # the average rank the budget ends at
    return Built(model, _adalora_effective(model, final), alloc.update_and_allocate, [alloc],
                 extra={"effective_at": "final budget (target_r x modules)"})


def _peft_adalora(task) -> Built:
    model = peft_adalora_model(task, 0)
    return Built(model, _trainable(model), model.base_model.update_and_allocate, [model.base_model.rankallocator])


def _moe(task, method) -> Built:
    from python_api.moe import apply_moe_adapters
    cfg = task.cfg
    experts, _, _ = moe_experts(task, method)
    model = task.fresh(0)
    torch.manual_seed(0)
    apply_moe_adapters(model, task.targets, experts, r=cfg["r"], alpha=2 * cfg["r"], load_balance_coef=0.001)
    for h in task.heads:
        for p in model.get_submodule(h).parameters():
            p.requires_grad_(True)
    return Built(model, _trainable(model), moe=True, extra={"experts": experts})


class _Trainer:
    """AdamW on a built model; ``step(i)`` is bench_accuracy.train's loop body without the LR schedule."""

    def __init__(self, built: Built, batch: dict):
        self.b, self.batch = built, batch
        self.params = [p for p in built.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=FULL["lr"], weight_decay=0.0)
        built.model.train()

    def step(self, i: int) -> None:
        from python_api.moe import moe_aux_loss
        loss = per_example_loss(self.b.model, self.batch).mean()
        if self.b.moe:
            aux = moe_aux_loss(self.b.model)
            if aux is not None:
                loss = loss + aux
        loss.backward()
        self.opt.step()
        if self.b.after_step is not None:
            self.b.after_step(i)

    def state_tensors(self) -> list[torch.Tensor]:
        return [t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t)]


def measure_method(built: Built, batch: dict) -> dict:
    """Counts and bytes of one method (see the module docstring); the second step is the one profiled."""
    model = built.model
    tr = _Trainer(built, batch)
    torch.manual_seed(0)
    tr.step(0)                          # optimizer (and allocator) state exists from here on
    tr.opt.zero_grad(set_to_none=True)  # outside the profiled call: the profiler does not see older frees
    weights = [*model.parameters(), *model.buffers()]
    opt_t = tr.state_tensors()
    alloc_t = [t for obj in built.state for t in _tensors(obj)]
    persistent = storage_bytes(weights + opt_t + alloc_t)
    torch.manual_seed(1)
    step = peak_alloc_bytes(lambda: tr.step(1))
    return {"trainable_params": _trainable(model), "effective_params": built.effective,
            "optimizer_state": sum(t.nbytes for t in opt_t if t.dim() > 0),
            "grad_bytes": storage_bytes([p.grad for p in model.parameters() if p.grad is not None]),
            "allocator_state": storage_bytes(alloc_t, exclude=weights + opt_t) if built.state else None,
            "peak_step_bytes": step["peak"], "peak_train_bytes": persistent + step["peak"],
            "persistent_bytes": persistent, "step_end_bytes": step["end"]}


def _shaplora(task, batch: dict, val: list[dict]) -> tuple[Built, int]:
    """The retrain model (ranks from one Taylor-Shapley pass on a super-network after two training steps) and
    the peak bytes of that pass."""
    from python_api.allocators.shaplora import allocate_ranks, apply_rank_masks, shapley_sensitivity
    from python_api.surgery import adapter_layers
    sup = Built(_svd_model(task, 0), 0)
    tr = _Trainer(sup, batch)
    torch.manual_seed(0)
    for i in range(2):
        tr.step(i)
        tr.opt.zero_grad(set_to_none=True)
    del tr
    scores = {}

    def score():
        scores.update(shapley_sensitivity(sup.model, val, "taylor", loss_fn=per_example_loss,
                                          generator=torch.Generator().manual_seed(0)))
    score()                                   # warm: the profiled pass is the second
    peak = peak_alloc_bytes(score)["peak"]
    budget = task.cfg["r"] * len(adapter_layers(sup.model))
    masks = allocate_ranks(scores, budget)
    model = _svd_model(task, 0)
    apply_rank_masks(model, masks)
    ranks = {n: int(m.sum()) for n, m in masks.items()}
    return Built(model, _effective_params(model), extra={"ranks": ranks}), peak


def build(task, method: str, batch: dict, val: list[dict]) -> tuple[Built, int | None]:
    if method == "head_only":
        return _head_only(task), None
    if method == "lora":
        return _lora(task), None
    if method.startswith("share"):
        return _lora(task, share=method[len("share"):]), None
    if method == "peft_lora":
        return _peft_lora(task), None
    if method == "adalora":
        return _adalora(task), None
    if method == "peft_adalora":
        return _peft_adalora(task), None
    if method == "shaplora":
        return _shaplora(task, batch, val)
    if method in ("moe_uniform", "alphalora"):
        return _moe(task, method), None
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


OPS = {"trainable_params": "params", "effective_params": "params", "optimizer_state": "bytes", "grad_bytes": "bytes",
       "allocator_state": "bytes", "peak_step_bytes": "bytes", "peak_train_bytes": "bytes",
       "shapley_pass_peak": "bytes"}


def to_rows(results: dict[str, dict], shape: str, threads: int) -> list[dict]:
    rows = []
    for method, res in results.items():
        for op, unit in OPS.items():
            v = res.get(op)
            if v is None:
                continue
            extra = {"threads": threads}
            for ref in ("lora", "peft_lora") if op in ("peak_step_bytes", "peak_train_bytes") else ("lora",):
                base = results.get(ref, {}).get(op)
                if base:
                    extra[f"ratio_vs_{ref}"] = round(v / base, 4)
            if op == "optimizer_state":
                extra["optimizer"] = "AdamW"
            if op == "peak_train_bytes":
                extra["persistent_bytes"] = res["persistent_bytes"]
            if op == "peak_step_bytes":
                extra["step_end_bytes"] = res["step_end_bytes"]
            if op == "trainable_params":
                extra.update(res.get("extra", {}))
            mode = "full" if op.startswith(("peak", "shapley")) else "alloc"
            rows.append(make_row(op, method, mode, shape, torch.float32, "cpu", v, unit, **extra))
    return rows


def run(quick: bool = False, methods=None, directory: str | None = None) -> list[dict]:
    """Measures ``methods`` (default: all, or the quick six) and writes ``<directory>/memory_cpu[_quick]``."""
    # One thread unless $BENCH_THREADS says otherwise: the bytes came out identical with 1 and 2 threads, and
    # a single thread is ~4x faster when other jobs share the cores.
    old_threads = torch.get_num_threads()
    threads = pin_threads(int(os.environ.get("BENCH_THREADS") or 1))
    try:
        rows, meta = _run(quick, methods, threads)
    finally:
        torch.set_num_threads(old_threads)
    write_results(rows, "memory_cpu_quick" if quick else "memory_cpu", meta, directory)
    return rows


def _run(quick: bool, methods, threads: int) -> tuple[list[dict], dict]:
    from python_api.app.data import rotten_tomatoes_splits
    sh = SHAPES[quick]
    cfg = dict(FULL)
    task = _Task(cfg)
    splits = rotten_tomatoes_splits(n_val=cfg["n_val"], n_test=cfg["n_test"], seed=0)
    tr, va = splits["train"], splits["validation"]
    batch = _batches(task.tokenizer, tr.texts[:sh["batch"]], tr.labels, sh["batch"], sh["seq"])[0]
    nv = sh["batch"] * sh["val_batches"]
    val = _batches(task.tokenizer, va.texts[:nv], va.labels[:nv], sh["batch"], sh["seq"])
    results = {}
    for method in methods or (QUICK_METHODS if quick else METHODS):
        built, shap_peak = build(task, method, batch, val)
        res = measure_method(built, batch)
        res["shapley_pass_peak"] = shap_peak
        res["extra"] = built.extra
        results[method] = res
        del built
        print(f"[memory] {method}: trainable {res['trainable_params']}, optimizer {res['optimizer_state']} B, "
              f"peak step {res['peak_step_bytes']} B, peak train {res['peak_train_bytes']} B", flush=True)
    shape = f"minilm-l6-B{sh['batch']}x{sh['seq']}-r{cfg['r']}"
    rows = to_rows(results, shape, threads)
    meta = {"threads": threads, "quick": quick, **sh, "r": cfg["r"], "r_init": cfg["r_init"],
            "experts_per_layer": cfg["experts_per_layer"], "optimizer": "AdamW(lr=2e-3, weight_decay=0)",
            "data": "first `batch` Rotten Tomatoes training texts (split seed 0), padded/truncated to `seq` tokens",
            "measure": "torch.profiler CPU memory events over the 2nd training step (bench.harness.peak_alloc_bytes)"}
    return rows, meta


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 2 x 16 tokens, six methods")
    ap.add_argument("--methods", nargs="+", choices=METHODS)
    a = ap.parse_args()
    rows = run(a.quick, a.methods)
    print(format_table(rows, cols=("op", "provider", "median", "unit", "ratio_vs_lora", "ratio_vs_peft_lora")))


if __name__ == "__main__":
    main()
