"""The whole fine-tuning step, side by side in one process: what a user's training loop feels.

    python -m bench.bench_step [--quick] [--models minilm smollm2] [--ranks 8 16] [--dtypes fp32 bf16]
                               [--steps 20] [--warmup 3]      # bench/results/step_cpu{,_quick}.{json,csv}

Models: MiniLM-L6 sequence classifier (batch 32 × 128 tokens, cross-entropy on 2 labels) and SmolLM2-135M as a
causal LM (batch 4 × 256, next-token loss), adapters on every linear inside the blocks (the models' target lists),
alpha = 2r, no dropout, nothing else trained. Inputs are fixed random token ids (timing does not depend on text).
Contestants, each a copy of the model sharing the frozen base tensors:
- ``floor``: the frozen base, forward + backward down to the input embeddings (no adapter, no optimizer state);
- ``peft``: PEFT ``get_peft_model`` with ``LoraConfig``;
- ``ours``: ``apply_adapters``;  ``ours_half_masked``: the same with the second half of every rank masked off;
- ``shareA``: ``apply_adapters(share="A")``;  ``moe``: ``apply_moe_adapters``, 4 experts of rank r/2 per
  linear, top-2 (the same adapter parameter count as rank 2r, half of it routed per token).
A step is ``zero_grad(set_to_none=True)``, forward (under ``torch.autocast("cpu", bfloat16)`` for bf16; the base
stays fp32, adapters fp32 master weights), loss, backward, ``AdamW.step()``. Steps of all contestants are
interleaved round-robin (bench.harness.measure); the median of ``steps`` timed steps after ``warmup`` is reported
with ratios to PEFT's and to the floor's median. Peak memory: bench.harness.peak_alloc_bytes over one more step
(PyTorch's CPU allocator above the level at entry: activations, gradients, optimizer state on the first step is
already allocated; oneDNN scratch not seen).
"""
from __future__ import annotations

import argparse
import copy
import os

import torch

from bench.harness import (RESULTS, format_table, results_dir, make_row, measure, peak_alloc_bytes, pin_threads,
                           write_results)

PLOTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots")
CONTESTANTS = ("floor", "peft", "ours", "ours_half_masked", "shareA", "moe")
BACKEND_ENV = "LORA_KERNELS_BACKEND"
REFERENCE = "ours_reference"   # optional (--reference): ``ours`` on the torch reference (LORA_KERNELS_BACKEND=torch)
SHAPES = {"minilm": (32, 128), "smollm2": (4, 256)}    # (batch, tokens)
QUICK = {"models": ("minilm",), "ranks": (8,), "dtypes": ("fp32",), "steps": 2, "warmup": 1,
         "shapes": {"minilm": (4, 32)}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MOE_EXPERTS = 4


def load(name: str):
    """``(model, vocab size, target module suffixes, task)`` for ``minilm`` (classification) or ``smollm2``
    (causal LM), fp32, offline."""
    from python_api.app import models
    if name == "minilm":
        model, _ = models.load_minilm(num_labels=2, seed=0)
        return model, model.config.vocab_size, list(models.MINILM_TARGETS), "cls"
    if name == "smollm2":
        import gguf  # noqa: F401  (transformers needs it to read the GGUF file; AssetMissing-like error otherwise)
        from transformers import AutoModelForCausalLM
        models._offline()
        models._quiet_transformers()
        path = models.smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     local_files_only=True, torch_dtype=torch.float32)
        return model.eval(), model.config.vocab_size, list(models.LLAMA_TARGETS), "lm"
    raise ValueError(f"model must be 'minilm' or 'smollm2', got {name!r}")


def make_batch(vocab: int, batch: int, seq: int, task: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out["labels"] = torch.randint(0, 2, (batch,), generator=g) if task == "cls" else ids
    return out


def _copy(model):
    # The frozen base tensors are shared by every contestant (surgery keeps them by reference): memory for six
    # copies of SmolLM2 would otherwise be 6 × 540 MB, and the timed work is the same.
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def build(name: str, base, targets: list[str], r: int, layers: int):
    """One contestant's model (train mode, only its adapters trainable)."""
    model = _copy(base)
    torch.manual_seed(0)
    if name == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()   # backward runs down to the embeddings' output
    elif name == "peft":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets))
    elif name in ("ours", "ours_half_masked", "shareA", REFERENCE):
        import python_api as lk
        masks = None
        if name == "ours_half_masked":
            mask = [i < r // 2 for i in range(r)]
            masks = {t: mask for t in targets}
        model = lk.apply_adapters(model, targets, r=r, alpha=2 * r, rank_masks=masks,
                                  share="A" if name == "shareA" else None)
    elif name == "moe":
        from python_api.moe import apply_moe_adapters
        apply_moe_adapters(model, targets, [MOE_EXPERTS] * layers, r=max(1, r // 2), alpha=2 * r, top_k=2)
    else:
        raise ValueError(f"unknown contestant {name!r}")
    for m in model.modules():
        # The adapter B matrices start at zero; a non-zero B makes every gradient path do real work.
        for attr in ("lora_B",):
            b = getattr(m, attr, None)
            if isinstance(b, torch.nn.Parameter):
                torch.nn.init.normal_(b, std=0.02)
            elif isinstance(b, torch.nn.ModuleDict):
                for lin in b.values():
                    torch.nn.init.normal_(lin.weight, std=0.02)
    return model.train()


def _loss(model, batch: dict, task: str) -> torch.Tensor:
    if task == "cls":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
    # transformers' causal-LM loss (shifted labels), as a user's loop gets it
    return model(**batch).loss


class Stepper:
    """One contestant's training step (AdamW; the floor has no trainable parameter and no optimizer)."""

    def __init__(self, model, batch: dict, task: str, dtype: torch.dtype, reference: bool = False):
        self.model, self.batch, self.task, self.dtype, self.reference = model, batch, task, dtype, reference
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0) if self.params else None

    def zero(self):
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)

    def run(self):
        old = os.environ.get(BACKEND_ENV)
        os.environ[BACKEND_ENV] = "torch" if self.reference else "auto"
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
                loss = _loss(self.model, self.batch, self.task)
            loss.backward()
        finally:
            if old is None:
                del os.environ[BACKEND_ENV]
            else:
                os.environ[BACKEND_ENV] = old
        if self.opt is not None:
            self.opt.step()

    def __call__(self):
        self.zero()
        self.run()


def bench_config(model_name: str, base, vocab: int, targets: list[str], task: str, r: int, dtype: str,
                 batch: int, seq: int, steps: int, warmup: int, contestants=CONTESTANTS) -> list[dict]:
    layers = base.config.num_hidden_layers
    data = make_batch(vocab, batch, seq, task)
    steppers = {c: Stepper(build(c, base, targets, r, layers), data, task, DTYPES[dtype], c == REFERENCE)
                for c in contestants}
    stats = measure(steppers, warmup=warmup, repeats=steps)
    peaks = {}
    for c, s in steppers.items():
        s.zero()   # outside the profiled call: the profiler does not see frees of older tensors
        peaks[c] = peak_alloc_bytes(s.run)["peak"]
    del steppers
    shape = f"{model_name}-b{batch}-s{seq}"
    rows = []
    for c in contestants:
        med = stats[c].median
        rows.append(make_row("train_step", c, f"r{r}", shape, DTYPES[dtype], "cpu", stats[c], model=model_name,
                             r=r, steps=steps, peak_bytes=peaks[c],
                             ratio_vs_peft=round(med / stats["peft"].median, 4) if "peft" in stats else None,
                             ratio_vs_floor=round(med / stats["floor"].median, 4) if "floor" in stats else None,
                             peak_ratio_vs_peft=round(peaks[c] / peaks["peft"], 4) if "peft" in peaks else None))
    return rows


def plot(rows: list[dict], path: str) -> str:
    """Step time relative to the floor per contestant, one group of bars per (model, r, dtype)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    groups = list(dict.fromkeys((r["shape"], r["mode"], r["dtype"]) for r in rows))
    names = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 3.8))
    for j, name in enumerate(names):
        vals = [next((r["ratio_vs_floor"] for r in rows if (r["shape"], r["mode"], r["dtype"]) == g
                      and r["provider"] == name), float("nan")) for g in groups]
        ax.bar([i + j * width for i in range(len(groups))], vals, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [" ".join(g) for g in groups], fontsize=7,
                  rotation=15, ha="right")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_ylabel("step time / frozen-base step (floor)")
    ax.set_title("Whole fine-tuning step, CPU, AdamW (lower is better)", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(quick: bool = False, models=None, ranks=None, dtypes=None, steps: int | None = None,
        warmup: int | None = None, threads: int = 2, directory: str | None = None, plots: str | None = None,
        reference: bool = False, shapes: dict | None = None, name: str | None = None) -> list[dict]:
    pin_threads(threads)
    directory = directory or results_dir()
    # beside the results when they go elsewhere (an installed package never writes into site-packages)
    plots = plots or (PLOTS if directory == RESULTS else directory)
    cfg = QUICK if quick else {"models": ("minilm", "smollm2"), "ranks": (8, 16), "dtypes": ("fp32", "bf16"),
                               "steps": 20, "warmup": 3, "shapes": SHAPES}
    models, ranks, dtypes = models or cfg["models"], ranks or cfg["ranks"], dtypes or cfg["dtypes"]
    steps, warmup = steps or cfg["steps"], warmup if warmup is not None else cfg["warmup"]
    contestants = CONTESTANTS + ((REFERENCE,) if reference else ())
    shapes = {**cfg["shapes"], **(shapes or {})}
    rows = []
    name = name or ("step_cpu_quick" if quick else "step_cpu")
    for m in models:
        base, vocab, targets, task = load(m)
        batch, seq = shapes[m]
        for r in ranks:
            for dt in dtypes:
                rows += bench_config(m, base, vocab, targets, task, r, dt, batch, seq, steps, warmup, contestants)
                # after every configuration: a long run killed part-way keeps what it measured
                write_results(rows, name, {"threads": threads, "quick": quick, "steps": steps, "warmup": warmup},
                              directory)
        del base
    plot(rows, os.path.join(plots, name + ".png"))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="+", choices=sorted(SHAPES))
    ap.add_argument("--ranks", nargs="+", type=int)
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference", action="store_true", help=f"add {REFERENCE!r}: ours on the reference backend")
    ap.add_argument("--batch", type=int, help="override the batch size (all models)")
    ap.add_argument("--seq", type=int, help="override the sequence length (all models)")
    ap.add_argument("--name", help="result file name (default step_cpu / step_cpu_quick)")
    a = ap.parse_args()
    shapes = None
    if a.batch or a.seq:
        base = QUICK["shapes"] if a.quick else SHAPES
        shapes = {m: (a.batch or b, a.seq or s) for m, (b, s) in base.items()}
    rows = run(a.quick, a.models, a.ranks, a.dtypes, a.steps, a.warmup, a.threads, reference=a.reference,
               shapes=shapes, name=a.name)
    print(format_table(rows, cols=("provider", "mode", "shape", "dtype", "median", "ratio_vs_peft",
                                   "ratio_vs_floor", "peak_ratio_vs_peft")))


if __name__ == "__main__":
    main()
