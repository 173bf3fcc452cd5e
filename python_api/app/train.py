"""``lora-kernels train``: fine-tune a local model on a local data file with one adapter method, offline.

Workflow: check every input (data, columns, labels, model files, ``--out``) before anything is written ->
seeded splits -> tokenise (truncation counted and reported once) -> adapters by method -> training with
a progress bar, periodic checkpoints and Ctrl-C -> test metric -> outputs in ``--out``:

- ``adapter_config.json`` + ``adapter_model.safetensors``: PEFT's LoRA format for ``lora``, ``shaplora`` and
  ``adalora`` (rank pattern after the final masking, the classifier head as ``modules_to_save``), so
  ``peft.PeftModel.from_pretrained(base, OUT)`` loads it; this package's format in ``OUT/adapter/``
  (``load_adapters(base, OUT/adapter)``) for ShareLoRA and MoE-LoRA, which PEFT cannot express. ``--merge``
  also writes ``merged/``: the full model with
  the adapters folded in, for ``AutoModel*.from_pretrained`` (not for MoE: routing is per token).
- ``metrics.json``, ``report.md`` (+ PNG plots), ``checkpoint/state.pt`` (what ``--resume`` reads) and
  ``.lora-kernels-train.json`` (identity of the run: marks the directory as ours).

Methods: ``lora`` (r, alpha 2r on every target), ``sharelora-a|b|ab`` (ShareLoRA, one matrix per module type),
``adalora`` (SVD form at ``--r-init``, AdaLoRA schedule down to the budget, PEFT's orthogonality weight 0.5),
``shaplora`` (super-network at ``--r-init``, LoRA's init, for half the steps, Shapley scoring on the validation split,
global top-budget ranks, fresh adapters retrained for all the steps; ``--retrain warm``: the super-network itself
continues as plain LoRA from its kept components), ``moe-uniform`` (MoE-LoRA, the same
number of experts in every block) and ``alphalora`` (experts per block from the layer alphas). ``--budget``
is the total rank over the adapted modules (adalora, shaplora; default r × modules) or the total number of
experts (moe-uniform, alphalora; default 2 × blocks).

Resume is exact: the data order is a function of (seed, epoch), and the checkpoint holds the trainable
tensors, the optimizer, the scheduler, the RNG states, the loss history, the allocator state and the
ShapLoRA phase and masks; a run stopped at step k and resumed ends with the same losses and bit-identical
adapters (CPU) as an uninterrupted one (tests/python_api/test_train_cli.py).
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import signal
import stat
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import byo_data, byo_model
from .byo_data import BadInput

METHODS = ("lora", "adalora", "shaplora", "sharelora-a", "sharelora-b", "sharelora-ab", "moe-uniform", "alphalora")
PEFT_METHODS = ("lora", "adalora", "shaplora")
MOE_METHODS = ("moe-uniform", "alphalora")
TASKS = ("classify", "causal-lm")
MARKER = ".lora-kernels-train.json"
CKPT_DIR = "checkpoint"
STATE_FILE = "state.pt"
MERGED_DIR = "merged"
ADAPTER_DIR = "adapter"   # this package's format (ShareLoRA, MoE): a checkpoint directory of its own, because
                          # save_adapters replaces a whole directory atomically and --out holds the run's other files
OUTPUT_NAMES = ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "report.md", "loss.png",
                "ranks.png", "experts.png", CKPT_DIR, MERGED_DIR, ADAPTER_DIR, MARKER)
# What must not change between a run and its --resume (anything else, e.g. --threads, may).
IDENTITY_KEYS = ("method", "task", "text_column", "label_column", "targets", "r", "r_init", "budget", "steps",
                 "epochs", "lr", "batch_size", "max_length", "seed", "bf16", "val_frac", "test_frac", "expert_r",
                 "beta", "eval_data", "budget_unit", "max_grad_norm", "retrain")
# what a run written before the key existed used
IDENTITY_DEFAULTS = {"budget_unit": "ranks", "max_grad_norm": 0.0, "retrain": "plain"}
# content hashes of the data files (a marker written before they existed has none: not checked)
DATA_HASHES = (("data_sha256", "--data", "data"), ("eval_data_sha256", "--eval-data", "eval_data"))
ORTH_WEIGHT = 0.5        # PEFT AdaLoraConfig.orth_reg_weight
SHAPLEY_VAL_EXAMPLES = 256


class Interrupted(Exception):
    """Ctrl-C: a resumable checkpoint was written (exit code 130)."""


class TrainingDiverged(RuntimeError):
    """A non-finite training loss, gradient norm, adapter weight or model output: the run stopped before writing
    it (the last checkpoint on disk is the last good one; no adapters, merged model or metrics; exit code 1)."""


@dataclass
class TrainConfig:
    model: str
    data: str
    method: str
    out: str
    task: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    eval_data: str | None = None
    targets: list[str] | None = None
    r: int = 8
    r_init: int = 12
    budget: int | None = None
    budget_unit: str = "ranks"       # adalora / shaplora: --budget counts ranks or trainable parameters
    retrain: str = "plain"           # shaplora: the retrain from a fresh init ("plain") or the super-network ("warm")
    steps: int | None = None
    epochs: float | None = None
    lr: float | None = None
    max_grad_norm: float = 1.0       # gradient-norm clipping before each AdamW step (0: off)
    batch_size: int | None = None
    max_length: int | None = None
    seed: int = 0
    bf16: bool = False
    grad_checkpointing: bool = False
    resume: bool = False
    overwrite: bool = False
    merge: bool = False
    verify: bool = True
    supernet_check: bool = True      # ShapLoRA: refuse to score a super-network that did not learn
    val_frac: float = 0.1
    test_frac: float = 0.1
    save_every: int = 50
    expert_r: int | None = None
    beta: float = 2.5
    threads: int | None = None
    progress: bool = True
    command: str = ""
    extra: dict = field(default_factory=dict)

    def defaults_for(self, task: str) -> "TrainConfig":
        """Task-dependent defaults filled in (a new object)."""
        c = copy.copy(self)
        causal = task == "causal-lm"
        c.task = task
        if c.lr is None:
            c.lr = 2e-4 if causal else 1e-3
        if c.batch_size is None:
            c.batch_size = 8 if causal else 16
        if c.max_length is None:
            c.max_length = 256 if causal else 128
        if c.expert_r is None:
            c.expert_r = max(1, c.r // 2)
        return c


# ---- checks that run before anything is written ------------------------------------------------------
def check_args(cfg: TrainConfig) -> None:
    if cfg.method not in METHODS:
        raise BadInput(f"--method: {cfg.method!r} is not one of {', '.join(METHODS)}")
    if cfg.task is not None and cfg.task not in TASKS:
        raise BadInput(f"--task: {cfg.task!r} is not one of {', '.join(TASKS)}")
    if cfg.steps is not None and cfg.epochs is not None:
        raise BadInput("--steps and --epochs: give one of them, not both")
    for name in ("r", "r_init", "budget", "steps", "batch_size", "max_length", "save_every", "expert_r"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise BadInput(f"--{name.replace('_', '-')}: expected a positive integer, got {v!r}")
    if not (isinstance(cfg.max_grad_norm, (int, float)) and math.isfinite(cfg.max_grad_norm)
            and cfg.max_grad_norm >= 0):
        raise BadInput(f"--max-grad-norm: expected a finite number >= 0 (0 switches clipping off), got "
                       f"{cfg.max_grad_norm!r}")
    for name in ("epochs", "lr"):
        v = getattr(cfg, name)
        if v is not None and not v > 0:
            raise BadInput(f"--{name}: expected a positive number, got {v!r}")
    if cfg.max_length is not None and cfg.max_length < 2:
        raise BadInput(f"--max-length: must be at least 2, got {cfg.max_length}")
    if cfg.budget_unit not in ("ranks", "params"):
        raise BadInput(f"--budget-unit: {cfg.budget_unit!r} is not one of ranks, params")
    if cfg.budget_unit == "params" and cfg.method not in ("adalora", "shaplora"):
        raise BadInput(f"--budget-unit params: only adalora and shaplora take a parameter budget, not {cfg.method}")
    if cfg.retrain not in ("plain", "warm"):
        raise BadInput(f"--retrain: {cfg.retrain!r} is not one of plain, warm")
    if cfg.retrain == "warm" and cfg.method != "shaplora":
        raise BadInput(f"--retrain warm: only shaplora retrains from a super-network, not {cfg.method}")
    if cfg.method in ("adalora", "shaplora") and cfg.r > cfg.r_init:
        raise BadInput(f"--r ({cfg.r}) must not exceed --r-init ({cfg.r_init}) for {cfg.method}")
    if cfg.merge and cfg.method in MOE_METHODS:
        raise BadInput(f"--merge: {cfg.method} routes each token to its own experts, so the adapters cannot be "
                       "folded into the base weights")
    if cfg.resume and cfg.overwrite:
        raise BadInput("--resume and --overwrite: give one of them, not both")


def identity(cfg: TrainConfig, src: byo_model.ModelSource, hashes: bool = True) -> dict:
    """The run's identity (the marker's content); ``hashes``: with the data files' sha256 (one more read of each)."""
    return {"model": src.fingerprint(), "data": os.path.abspath(cfg.data),
            "model_sha256": byo_model.weights_sha256(src) if hashes else None,
            **{k: getattr(cfg, k) for k in IDENTITY_KEYS},
            **{key: None if not hashes or getattr(cfg, attr) is None else file_sha256(getattr(cfg, attr))
               for key, _, attr in DATA_HASHES}}


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, read in 1 MiB pieces; of a directory (``datasets.save_to_disk``): of every regular
    file's relative path and bytes, in sorted order (links, sockets and pipes, which ``load_from_disk`` does not
    read, are left out)."""
    files = [("", path)]
    if os.path.isdir(path):
        files = sorted((os.path.relpath(os.path.join(d, f), path), os.path.join(d, f))
                       for d, _, names in os.walk(path) for f in names
                       if stat.S_ISREG(os.lstat(os.path.join(d, f)).st_mode))
    return byo_data.sha256_files(files)


def check_out(cfg: TrainConfig, ident: dict) -> None:
    """Refuses an ``--out`` that is not ours (without ``--overwrite``) and a ``--resume`` of another run."""
    out = cfg.out
    marker = os.path.join(out, MARKER)
    if cfg.resume:
        state = os.path.join(out, CKPT_DIR, STATE_FILE)
        if not os.path.exists(marker) or not os.path.exists(state):
            raise BadInput(f"--resume: {out} holds no lora-kernels train checkpoint ({CKPT_DIR}/{STATE_FILE})")
        try:
            with open(marker) as f:
                old = json.load(f)
            if not isinstance(old, dict):
                raise ValueError(f"a JSON {type(old).__name__}, not an object")
        except (OSError, ValueError) as e:
            raise BadInput(f"--resume: {marker} cannot be read ({byo_data.first_line(e)}); pass "
                           "--overwrite instead of --resume to start over") from None
        if old.get("model") != ident["model"]:
            raise BadInput(f"--resume: the checkpoint in {out} is for model {old.get('model', {}).get('model')!r} "
                           f"({old.get('model', {}).get('path')}), not {ident['model']['model']!r}")
        if old.get("method") != ident["method"]:
            raise BadInput(f"--resume: the checkpoint in {out} is for method {old.get('method')!r}, "
                           f"not {ident['method']!r}")
        hashes = {key for key, _, _ in DATA_HASHES} | {"model_sha256", "label_names"}
        diff = [k for k in ident if k not in hashes and old.get(k, IDENTITY_DEFAULTS.get(k)) != ident[k]]
        if diff:
            args = ", ".join(f"--{k.replace('_', '-')} {old.get(k)!r} (now {ident[k]!r})" for k in diff)
            raise BadInput(f"--resume: the checkpoint in {out} was written with {args}; resume with the same options")
        if old.get("label_names") is not None and old["label_names"] != ident["label_names"]:
            raise BadInput(f"--resume: the checkpoint in {out} numbers the classes {old['label_names']}, this run "
                           f"{ident['label_names']} (the head's ids would change meaning); pass --overwrite instead "
                           "of --resume to start over")
        if old.get("model_sha256") is not None and ident["model_sha256"] is not None \
                and old["model_sha256"] != ident["model_sha256"]:   # same path and config, other weights
            raise BadInput(f"--model: {cfg.model}: its weights changed since the checkpoint in {out} was written "
                           f"(sha256 {old['model_sha256'][:12]}…, now {ident['model_sha256'][:12]}…); resume with "
                           "the model the run started with, or pass --overwrite instead of --resume to start over")
        for key, flag, attr in DATA_HASHES:   # a marker without the hash (an older version) is not checked
            if old.get(key) is not None and ident[key] is not None and old[key] != ident[key]:
                raise BadInput(f"{flag}: {getattr(cfg, attr)} changed since the checkpoint in {out} was written "
                               f"(sha256 {old[key][:12]}…, now {ident[key][:12]}…); resume with the data the run "
                               "started with, or pass --overwrite instead of --resume to start over")
        return
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise BadInput(f"--out: {out} exists and is not a directory")
    if not os.listdir(out):
        return
    if cfg.overwrite:
        if not os.path.isfile(marker):   # not ours: --overwrite writes next to the user's files, never over them
            clash = _existing_outputs(out)
            if clash:
                raise BadInput(f"--out: {out} was not written by lora-kernels train and already holds "
                               f"{', '.join(clash)}, which this run would write; --overwrite never replaces files "
                               "it did not write: move them away or choose another directory")
        return
    if os.path.exists(marker):
        raise BadInput(f"--out: {out} already holds a lora-kernels train run; pass --resume to continue it "
                       "or --overwrite to start over")
    raise BadInput(f"--out: {out} exists and was not written by lora-kernels train; pass --overwrite to write "
                   "into it anyway, or choose another directory")


def _existing_outputs(out: str) -> list[str]:
    return [name + ("/" if os.path.isdir(os.path.join(out, name)) else "") for name in OUTPUT_NAMES
            if os.path.lexists(os.path.join(out, name))]


def _clear_ours(out: str) -> None:
    """A previous run's outputs, for ``--overwrite`` of a directory that is ours (holds the marker); a directory
    without the marker is never cleared."""
    if not os.path.isfile(os.path.join(out, MARKER)):
        return
    for name in OUTPUT_NAMES:
        p = os.path.join(out, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.remove(p)


# ---- data -> tensors -----------------------------------------------------------------------------------
@dataclass
class Encoded:
    ids: list[list[int]]
    labels: list[int] | None

    def __len__(self):
        return len(self.ids)


def encode(tok, ex: byo_data.Examples, max_length: int) -> tuple[Encoded, int]:
    """Token ids truncated to ``max_length`` and the number of texts that were longer."""
    full = tok(ex.texts, truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
    cut = tok(ex.texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    longer = sum(len(a) > max_length for a in full)
    return Encoded(cut, ex.labels), longer


def collate(tok, enc: Encoded, idx: list[int], task: str) -> dict[str, torch.Tensor]:
    b = tok.pad({"input_ids": [enc.ids[i] for i in idx]}, return_tensors="pt", padding=True)
    out = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    if task == "classify":
        out["labels"] = torch.tensor([enc.labels[i] for i in idx], dtype=torch.int64)
    else:
        out["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)   # loss on real tokens only
    return out


def order_for(n: int, seed: int, epoch: int) -> list[int]:
    """The epoch's data order: a function of (seed, epoch) only, so a resumed run sees the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    per_epoch = math.ceil(n / batch_size)
    epoch, i = divmod(step, per_epoch)
    order = order_for(n, seed, epoch)
    return order[i * batch_size:(i + 1) * batch_size]


# ---- losses --------------------------------------------------------------------------------------------
def per_example_loss(model, batch, task: str) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if task == "classify":
        return nn.functional.cross_entropy(out.logits.float(), batch["labels"], reduction="none")
    nll, cnt = _token_nll(out.logits, batch["labels"])
    return nll / cnt.clamp_min(1)


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and number of predicted tokens per example (padding = -100 ignored)."""
    # Shift the labels, not the logits: slicing [B, T-1, V] out of the logits copies them (0.4 GB at batch
    # 8 x 256 with a 49k vocabulary), the padded labels cost nothing; the last position predicts nothing.
    lb = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    tok = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), lb.reshape(-1),
                                      ignore_index=-100, reduction="none").view(lb.shape)
    return tok.sum(1), (lb != -100).sum(1)


def batch_loss(model, batch, task: str) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if task == "classify":
        return nn.functional.cross_entropy(out.logits.float(), batch["labels"])
    nll, cnt = _token_nll(out.logits, batch["labels"])
    return nll.sum() / cnt.sum().clamp_min(1)   # mean over the batch's real tokens, as transformers does


@torch.no_grad()
def evaluate(model, tok, enc: Encoded, task: str, batch_size: int) -> dict:
    """The split's metric; ``finite`` is False when some logit was NaN / Inf (the metric then means nothing)."""
    model.eval()
    finite = True
    if task == "classify":
        correct = 0
        for i in range(0, len(enc), batch_size):
            b = collate(tok, enc, list(range(i, min(i + batch_size, len(enc)))), task)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            finite = finite and bool(torch.isfinite(logits).all())
            correct += int((logits.argmax(-1) == b["labels"]).sum())
        return {"accuracy": correct / len(enc), "finite": finite}
    nll, cnt = 0.0, 0
    for i in range(0, len(enc), batch_size):
        b = collate(tok, enc, list(range(i, min(i + batch_size, len(enc)))), task)
        s, c = _token_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        nll += float(s.double().sum())
        cnt += int(c.sum())
    if cnt == 0:
        return {"perplexity": float("nan"), "loss": float("nan"), "tokens": 0, "finite": True}
    finite = math.isfinite(nll)
    ppl = math.exp(nll / cnt) if nll / cnt < 700 else float("inf")   # math.exp overflows (an error) past ~709
    return {"perplexity": ppl, "loss": nll / cnt, "tokens": cnt, "finite": finite}


# ---- adapters ------------------------------------------------------------------------------------------
def adapt(base: nn.Module, cfg: TrainConfig, targets: list[str], heads: list[str], *, masks=None,
          experts=None) -> nn.Module:
    """A copy of ``base`` with ``cfg.method``'s adapters (``masks`` / ``experts``: a finished allocation)."""
    model = _adapt(base, cfg, targets, heads, masks, experts)
    if cfg.grad_checkpointing:
        # recompute each block in backward: activation memory of one block instead of all (about 1/3 more compute)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _adapt(base, cfg, targets, heads, masks, experts):
    import python_api as lk

    model = copy.deepcopy(base)
    torch.manual_seed(cfg.seed + 1)   # adapter init: the same for a fresh run and a resumed one
    m = cfg.method
    if m in MOE_METHODS:
        lk.apply_moe_adapters(model, targets, experts, r=cfg.expert_r, alpha=2 * cfg.expert_r)
        for h in heads:
            for p in model.get_submodule(h).parameters():
                p.requires_grad_(True)
        return model
    share = {"sharelora-a": "A", "sharelora-b": "B", "sharelora-ab": "AB"}.get(m)
    if m == "shaplora" and masks is not None:
        # the retrain: plain LoRA with the allocated rank pattern, at uniform LoRA's scale (alpha = 2·rank), or for
        # the warm retrain at the super-network's (alpha/r = 2r / r_init: it continues the super-network)
        from ..allocators.shaplora import to_plain_lora
        alpha = 2 * cfg.r if cfg.retrain == "warm" else 2 * cfg.r_init
        svd = lk.apply_adapters(model, targets, r=cfg.r_init, alpha=alpha, svd=True, modules_to_save=heads or None)
        return to_plain_lora(svd, masks)
    if m in ("adalora", "shaplora"):
        # ShapLoRA's super-network starts as LoRA does (svd_init="lora": it learns within its half of the steps);
        # AdaLoRA keeps PEFT's init
        return lk.apply_adapters(model, targets, r=cfg.r_init, alpha=2 * cfg.r, svd=True, rank_masks=masks,
                                 svd_init="lora" if m == "shaplora" else "adalora", modules_to_save=heads or None)
    return lk.apply_adapters(model, targets, r=cfg.r, alpha=2 * cfg.r, share=share, modules_to_save=heads or None)


def active_trainable(model: nn.Module) -> tuple[int, int]:
    """``(all, adapters only)`` trainable scalars that act: masked ranks (rank mask, or AdaLoRA's zeroed λ after
    the final mask) do not count, each shared Parameter counts once."""
    import python_api as lk

    # count_trainable already leaves out masked ranks and counts a shared Parameter once
    total = lk.count_trainable(model)
    adapters = lk.count_trainable(model, adapters_only=True)
    return total, adapters


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out.update({n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("rank_mask")})
    return out


@torch.no_grad()
def _load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    live = dict(model.named_parameters())
    live.update(dict(model.named_buffers()))
    missing = [k for k in state if k not in live]
    if missing:
        raise BadInput(f"--resume: checkpoint tensors {missing[:4]} do not exist in this model")
    for k, v in state.items():
        live[k].copy_(v)


# ---- the training loop --------------------------------------------------------------------------------
class _Stop:
    """Ctrl-C sets a flag; the loop finishes the step it is in, writes a checkpoint and stops. A second Ctrl-C
    interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:   # not the main thread: no handler, Ctrl-C raises as usual
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


class Run:
    """One ``train`` invocation: holds the pieces and the resumable state."""

    def __init__(self, cfg: TrainConfig, log=print, after_step=None):
        self.cfg, self.log, self.after_step = cfg, log, after_step
        self.checkpoints = True
        self.state: dict = {"phase": None, "step": 0, "losses": {}, "train_seconds": 0.0,
                            "allocation_seconds": 0.0, "phase_seconds": {}, "masks": None, "experts": None,
                            "alphas": None, "score_stability": None, "final_pattern": None, "supernet_before": None}

    # -- checkpoints
    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.cfg.out, CKPT_DIR, STATE_FILE)

    def save(self, model, opt, sched, allocator):
        if not self.checkpoints:
            return
        st = dict(self.state)
        st["trainable"] = _trainable_state(model) if model is not None else None
        st["optimizer"] = opt.state_dict() if opt is not None else None
        st["scheduler"] = sched.state_dict() if sched is not None else None
        st["allocator"] = allocator.state_dict() if allocator is not None else None
        st["rng"] = {"torch": torch.get_rng_state(), "python": _py_state()}
        st["masks"] = None if self.state["masks"] is None else {k: v.clone() for k, v in self.state["masks"].items()}
        os.makedirs(os.path.dirname(self.ckpt_path), exist_ok=True)
        tmp = self.ckpt_path + ".tmp"
        torch.save(st, tmp)
        os.replace(tmp, self.ckpt_path)   # a kill while writing leaves the previous checkpoint whole

    def load(self) -> dict:
        try:
            st = torch.load(self.ckpt_path, weights_only=True)
            if not isinstance(st, dict) or not {"phase", "step", "trainable", "optimizer", "rng"} <= set(st):
                raise ValueError("not a lora-kernels train checkpoint")
        except OSError as e:   # unreadable, not damaged (permissions, I/O): starting over would lose it
            raise BadInput(f"--resume: {self.ckpt_path} cannot be read ({byo_data.first_line(e)}); it is left as it "
                           f"is: make it readable and --resume again") from None
        except Exception as e:   # a truncated or overwritten file: torch names no file
            msg = byo_data.first_line(e)
            raise BadInput(f"--resume: {self.ckpt_path} is damaged and cannot be read; pass --overwrite instead of "
                           f"--resume to start over ({msg})") from None
        for k in self.state:
            if k in st:
                self.state[k] = st[k]
        return st

    # -- one training phase
    def train_phase(self, phase: str, model, train_enc: Encoded, tok, steps: int, resume_state: dict | None,
                    allocator_factory=None):
        cfg = self.cfg
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _linear_decay(steps))
        allocator = allocator_factory(model, steps) if allocator_factory else None
        start = 0
        losses = self.state["losses"].setdefault(phase, [])
        if resume_state is not None:
            _load_trainable(model, resume_state["trainable"])
            opt.load_state_dict(resume_state["optimizer"])
            sched.load_state_dict(resume_state["scheduler"])
            if allocator is not None:
                allocator.load_state_dict(resume_state["allocator"])
            torch.set_rng_state(resume_state["rng"]["torch"])
            random.setstate(_py_unstate(resume_state["rng"]["python"]))
            start = int(resume_state["step"])
            del losses[start:]
        self.state["phase"] = phase
        bar = _bar(steps, start, phase, cfg)
        t0, toks = time.perf_counter(), 0
        seconds_before = self.state["phase_seconds"].get(phase, 0.0)
        if phase == "supernet":
            self.state["_sup_before"] = seconds_before
        model.train()
        with _Stop() as stop:
            for step in range(start, steps):
                idx = batch_indices(len(train_enc), cfg.batch_size, cfg.seed, step)
                batch = collate(tok, train_enc, idx, cfg.task)
                opt.zero_grad(set_to_none=True)
                with _autocast(cfg):
                    loss = batch_loss(model, batch, cfg.task)
                    if cfg.method in MOE_METHODS:
                        import python_api as lk
                        aux = lk.moe_aux_loss(model)
                        total = loss if aux is None else loss + aux
                    elif cfg.method == "adalora" and phase == "train":
                        from ..allocators.adalora import orthogonality_penalty
                        total = loss + ORTH_WEIGHT * orthogonality_penalty(model)
                    else:
                        total = loss
                loss_value = float(loss.detach())
                if not (math.isfinite(loss_value) and (total is loss or math.isfinite(float(total.detach())))):
                    what = f"the training loss is {loss_value}" if not math.isfinite(loss_value) else \
                        f"the training objective (loss {loss_value} plus the method's extra term) is not finite"
                    raise self.diverged(phase, step + 1, steps, what)
                total.backward()
                if cfg.max_grad_norm:   # transformers.Trainer's default clipping (1.0); 0 switches it off
                    norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                    if not math.isfinite(norm):
                        raise self.diverged(phase, step + 1, steps, f"the gradient norm is {norm}")
                opt.step()
                sched.step()
                if allocator is not None:
                    # 1-based: with tfinal = 0 the last step (T) is the final mask to the budget
                    allocator.update_and_allocate(step + 1)
                losses.append(loss_value)
                toks += int(batch["attention_mask"].sum())
                self.state["step"] = step + 1
                self.state["phase_seconds"][phase] = seconds_before + time.perf_counter() - t0
                self.state["train_seconds"] = self.state["phase_seconds"].get("train", 0.0)
                if bar is not None:
                    el = max(time.perf_counter() - t0, 1e-9)
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{toks / el:,.0f}")
                if self.after_step is not None:
                    self.after_step(phase, step + 1)
                done = step + 1 == steps
                checkpoint = (stop.requested and not done) or (step + 1) % cfg.save_every == 0 or done
                if checkpoint:   # never checkpoint (or, at the end, export) weights that are no longer finite
                    bad = [n for n, p in model.named_parameters()
                           if p.requires_grad and not bool(torch.isfinite(p).all())]
                    if bad:
                        raise self.diverged(phase, step + 1, steps, f"the trainable weights {bad[:3]} are not finite")
                if stop.requested and not done:
                    if bar is not None:
                        bar.close()
                    self.save(model, opt, sched, allocator)
                    raise Interrupted(f"interrupted at {phase} step {step + 1}/{steps}; checkpoint written to "
                                      f"{self.ckpt_path}. Resume with:\n  {_resume_command(cfg)}")
                if (step + 1) % cfg.save_every == 0 or done:
                    self.save(model, opt, sched, allocator)
        if bar is not None:
            bar.close()
        model.eval()
        return allocator

    def diverged(self, phase: str, step: int, steps: int, what: str) -> TrainingDiverged:
        cfg = self.cfg
        ckpt = self.checkpoints and os.path.exists(self.ckpt_path)
        kept = f"the last good checkpoint {self.ckpt_path} is left as it was" if ckpt else "no checkpoint was written"
        return TrainingDiverged(
            f"{phase} step {step}/{steps}: {what}; stopped before writing it ({kept}; no adapters, merged model or "
            f"metrics). Lower --lr (now {cfg.lr}) or clip the gradients with --max-grad-norm (now "
            f"{cfg.max_grad_norm}{', off' if not cfg.max_grad_norm else ''})"
            + (", and start over with --overwrite" if ckpt else ""))


def _autocast(cfg):
    import contextlib
    return torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()


def _linear_decay(steps: int):
    return lambda s: max(0.0, 1.0 - s / max(1, steps))


def _bar(total: int, initial: int, desc: str, cfg: TrainConfig):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)


def _py_state():
    v, st, gauss = random.getstate()
    return [v, list(st), gauss]


def _py_unstate(s):
    return (s[0], tuple(s[1]), s[2])


def _resume_command(cfg: TrainConfig) -> str:
    cmd = cfg.command or "lora-kernels train ..."
    return cmd if "--resume" in cmd.split() else cmd + " --resume"


# ---- the workflow --------------------------------------------------------------------------------------
def prepare(cfg: TrainConfig, log=print, check_output: bool = True) -> dict:
    """Every check and load that precedes writing: returns the pieces of the run (nothing written)."""
    check_args(cfg)
    src = byo_model.resolve(cfg.model)
    train_ex, info = byo_data.load_examples(cfg.data, cfg.text_column, cfg.label_column, cfg.task)
    max_length_given = cfg.max_length is not None
    given = (cfg.text_column, cfg.label_column)   # what the user named (None: each file's own default)
    cfg = cfg.defaults_for(info["task"])
    cfg.text_column, cfg.label_column = info["text_column"], info["label_column"]
    if info["task"] == "classify":   # a fine-tuned classifier keeps what each of its head's ids means
        train_ex = _in_head_order(train_ex, byo_model.head_label_names(src), cfg.model, log)
    if cfg.eval_data is not None:
        test_ex = _eval_examples(cfg, given, train_ex)
        splits = byo_data.split(train_ex, cfg.val_frac, 0.0, cfg.seed, with_test=False)
        splits["test"] = test_ex
    else:
        splits = byo_data.split(train_ex, cfg.val_frac, cfg.test_frac, cfg.seed)
    tok = byo_model.load_tokenizer(src)
    tok.padding_side = "right"
    base = byo_model.load_model(src, cfg.task, train_ex.label_names or None, cfg.seed, tok,
                                torch.bfloat16 if cfg.bf16 else torch.float32)
    _check_finite_weights(cfg, base)
    targets = byo_model.resolve_targets(base, cfg.targets)
    heads = byo_model.head_modules(base, cfg.task)
    _check_model_fit(cfg, base, targets, max_length_given)
    ident = identity(cfg, src, hashes=check_output)   # alloc writes no marker: its data is not hashed
    ident["label_names"] = train_ex.label_names or None   # the class order, i.e. what each head id means
    if check_output:
        check_out(cfg, ident)
    enc, longer = {}, {}
    for k, ex in splits.items():
        enc[k], longer[k] = encode(tok, ex, cfg.max_length)
    if cfg.task == "causal-lm":   # a text of one token has no next token: no loss, a perplexity of NaN
        for k, e in enc.items():
            if e.ids and not any(len(ids) >= 2 for ids in e.ids):
                what = "--eval-data" if k == "test" and cfg.eval_data is not None else "--data"
                raise BadInput(f"{what}: no {k} text has 2 or more tokens after tokenisation (the {k} split's "
                               f"longest has {max(map(len, e.ids))}): a causal LM has nothing to predict")
    n_blocks = len({_block(n) for n in targets})
    # parameters one rank adds per module: plain LoRA (shaplora's retrain) in + out, SVD form (adalora) one more
    width = {n: base.get_submodule(n).in_features + base.get_submodule(n).out_features for n in targets}
    cost = {n: w + (cfg.method == "adalora") for n, w in width.items()}
    if cfg.budget is None:
        if cfg.budget_unit == "params":   # uniform LoRA's adapter parameters at --r
            cfg.budget = cfg.r * sum(width.values())
        else:
            cfg.budget = (2 * n_blocks) if cfg.method in MOE_METHODS else cfg.r * len(targets)
        ident["budget_default"] = cfg.budget
    if cfg.method in ("adalora", "shaplora") and cfg.budget_unit == "ranks" and cfg.budget > cfg.r_init * len(targets):
        raise BadInput(f"--budget: {cfg.budget} ranks exceed the {cfg.r_init} × {len(targets)} = "
                       f"{cfg.r_init * len(targets)} of the super-network (raise --r-init)")
    if cfg.budget_unit == "params":
        most = cfg.r_init * sum(cost.values())
        if not min(cost.values()) <= cfg.budget <= most:
            raise BadInput(f"--budget: {cfg.budget} parameters is outside [{min(cost.values())}, {most}] (one rank "
                           f"of the smallest module up to all {cfg.r_init} × {len(targets)} ranks; raise --r-init)")
    n_train = len(enc["train"])
    steps = cfg.steps if cfg.steps is not None else math.ceil((cfg.epochs or 1.0) * math.ceil(n_train / cfg.batch_size))
    cfg.steps_resolved = steps   # type: ignore[attr-defined]
    return {"cfg": cfg, "src": src, "splits": splits, "info": info, "tok": tok, "base": base, "targets": targets,
            "heads": heads, "ident": ident, "enc": enc, "longer": longer, "steps": steps, "n_blocks": n_blocks}


def _in_head_order(ex: byo_data.Examples, head: list[str] | None, model: str, log) -> byo_data.Examples:
    """The examples with their classes numbered as the model's classifier head numbers them (its ``id2label``),
    when the head's class names are the data's (exactly, else up to letter case); otherwise unchanged, with a
    warning when the head names other classes (its ids then take the data's classes in sorted order)."""
    names = ex.label_names
    if head is None or head == names or len(head) != len(names):   # a size mismatch is refused by load_model
        return ex
    if names == [str(i) for i in range(len(names))]:   # labels 0 … n-1 are the head's ids already
        return ex
    for key in (str, str.casefold):
        pos = {key(n): i for i, n in enumerate(head)}
        if len(pos) == len(head) and sorted(pos) == sorted({key(n) for n in names}) and len(set(map(key, names))) \
                == len(names):
            new = [pos[key(n)] for n in names]
            log(f"note: classes numbered as --model's classifier head numbers them: {head}")
            return byo_data.Examples(ex.texts, [new[i] for i in ex.labels],   # the data's spellings, head order
                                     [names[new.index(j)] for j in range(len(head))])
    warnings.warn(f"--model: {model} is a classifier whose head names its classes {head}, but the data's classes "
                  f"are {names}: head id i is trained as the data's i-th class in sorted order ({names}); rename the "
                  "data's labels to the head's names to keep what each id means", stacklevel=3)
    return ex


def _eval_examples(cfg: TrainConfig, given: tuple[str | None, str | None], train_ex: byo_data.Examples):
    """``--eval-data``'s examples: its columns are the ones the user named (``given``), else the ones ``--data``
    resolved to where this file has them too (a file holding both "text" and the training file's "sentence" is
    evaluated on "sentence"), else its own defaults; a ``.txt`` file is its one column ``text``, no labels."""
    text_col, label_col = given
    if byo_data.file_format(cfg.eval_data, "--eval-data") == "text":
        if cfg.task == "classify":
            raise BadInput(f"--eval-data: {cfg.eval_data}: a .txt file holds text only, no labels; classification "
                           "needs a table with a label column (.csv, .tsv, .jsonl, .parquet)")
        text_col, label_col = None, None
    elif text_col is None or label_col is None:
        cols = set(byo_data.read_table(cfg.eval_data, "--eval-data").columns)
        text_col = text_col or (cfg.text_column if cfg.text_column in cols else None)
        label_col = label_col or (cfg.label_column if cfg.label_column in cols else None)
    ex, _ = byo_data.load_examples(cfg.eval_data, text_col, label_col, cfg.task,
                                   label_names=train_ex.label_names or None, arg="--eval-data")
    return ex


def _check_finite_weights(cfg: TrainConfig, base) -> None:
    """A NaN / Inf in the base weights makes every loss NaN: refused at load time (one pass over the weights)."""
    for name, p in base.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise BadInput(f"--model: {cfg.model}: weight {name} holds non-finite values (NaN or Inf); every "
                           "training loss would be NaN. Use an intact copy of the model")


def _check_model_fit(cfg: TrainConfig, base, targets: list[str], max_length_given: bool) -> None:
    """What the model itself bounds, as bad input (exit 2, nothing written) rather than an error deep in the run:
    ranks above the narrowest targeted module, sequences longer than the model's positions (the default length is
    lowered to them instead), fewer experts than MoE blocks, MoE targets in two block stacks."""
    from ..allocators.alphalora import DEFAULT_MIN_EXPERTS

    conf = getattr(base, "config", None)
    limit = getattr(conf, "max_position_embeddings", None)
    if getattr(conf, "rope_theta", None) is not None or getattr(conf, "rope_scaling", None) is not None:
        limit = None   # rotary positions: longer sequences run (quality past the trained length is the user's call)
    elif isinstance(limit, int) and "roberta" in str(getattr(conf, "model_type", "")):
        limit -= (getattr(conf, "pad_token_id", None) or 0) + 1   # RoBERTa's positions start after the pad index
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 2 and cfg.max_length > limit:
        if max_length_given:
            raise BadInput(f"--max-length: {cfg.max_length} tokens exceed the model's {limit} positions "
                           "(max_position_embeddings)")
        cfg.max_length = limit
    width = {n: min(base.get_submodule(n).in_features, base.get_submodule(n).out_features) for n in targets}
    narrow = min(width, key=width.get)
    if cfg.method in MOE_METHODS:
        ranks = {"--expert-r": cfg.expert_r}
    else:
        ranks = {"--r": cfg.r, **({"--r-init": cfg.r_init} if cfg.method in ("adalora", "shaplora") else {})}
    for flag, r in ranks.items():
        if r is not None and r > width[narrow]:
            raise BadInput(f"{flag}: rank {r} exceeds min(in, out) = {width[narrow]} of the targeted module {narrow!r}")
    from ..surgery import block_stack
    stacks = sorted({block_stack(n) for n in targets})
    if cfg.method in MOE_METHODS and len(stacks) > 1:   # an encoder-decoder's encoder.layers and decoder.layers
        raise BadInput(f"--targets: {cfg.method} allocates experts per block index, and the targeted modules lie in "
                       f"{len(stacks)} stacks of numbered blocks {stacks}, whose block i would be merged; name the "
                       f"modules of one stack in full (e.g. {[n for n in targets if block_stack(n) == stacks[0]][0]})")
    n_blocks = len({_block(n) for n in targets})
    if cfg.method in MOE_METHODS and cfg.budget is not None and cfg.budget < n_blocks * DEFAULT_MIN_EXPERTS:
        raise BadInput(f"--budget: {cfg.budget} experts are fewer than the {n_blocks} targeted blocks "
                       f"(each needs at least {DEFAULT_MIN_EXPERTS})")


def _block(name: str) -> int:
    from ..surgery import layer_index
    return layer_index(name)


def run(cfg: TrainConfig, log=print, after_step=None, keep: dict | None = None) -> dict:
    """Runs ``lora-kernels train``; returns the metrics dict. Raises :class:`BadInput` (nothing written) or
    :class:`Interrupted` (checkpoint written). ``after_step(phase, step)`` is called after every optimizer step;
    ``keep`` (a dict) receives the trained ``model`` and the ``tokenizer``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    P = prepare(cfg, log)
    cfg, steps, targets = P["cfg"], P["steps"], P["targets"]
    sizes = {k: len(v) for k, v in P["splits"].items()}
    log(f"data: {P['info']['path']} ({P['info']['rows']} rows; text column {cfg.text_column!r}"
        + (f", label column {cfg.label_column!r}, {len(P['splits']['train'].label_names)} classes" if cfg.label_column
           else "") + f"); task {cfg.task}")
    split_how = "stratified by label" if cfg.task == "classify" else "seeded"
    src_test = "--eval-data" if cfg.eval_data else f"cut from --data, {split_how}, seed {cfg.seed}"
    log(f"splits: train {sizes['train']}, validation {sizes['validation']}, test {sizes['test']} ({src_test})")
    n_long = sum(P["longer"].values())
    if n_long:
        log(f"note: {n_long} of {sum(sizes.values())} texts are longer than --max-length {cfg.max_length} tokens "
            f"and were truncated ({', '.join(f'{k} {v}' for k, v in P['longer'].items() if v)})")
    log(f"model: {byo_model.describe(P['src'])}; {len(targets)} target modules in {P['n_blocks']} blocks; "
        f"method {cfg.method}; {steps} steps of batch {cfg.batch_size}; lr {cfg.lr}")

    made_dirs = _missing_dirs(cfg.out)
    os.makedirs(cfg.out, exist_ok=True)
    runner = Run(cfg, log, after_step)
    resume_state = None
    if cfg.resume:
        resume_state = runner.load()
        log(f"resuming from {runner.ckpt_path}: {resume_state['phase']} step {resume_state['step']}")
        return _train_and_write(cfg, P, runner, resume_state, log, keep, t_start)
    _clear_ours(cfg.out)   # only a directory that is ours: check_out refused a foreign one holding our file names
    with open(os.path.join(cfg.out, MARKER), "w") as f:
        json.dump(P["ident"], f, indent=1)
    try:
        return _train_and_write(cfg, P, runner, resume_state, log, keep, t_start)
    except BaseException:
        _undo_start(cfg.out, runner, made_dirs)
        raise


def _missing_dirs(path: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, deepest first (what ``os.makedirs(path)`` creates)."""
    out, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return out


def _undo_start(out: str, runner: Run, made_dirs: list[str]) -> None:
    """A run that failed before its first checkpoint leaves nothing to resume: the marker this run wrote goes (and
    the directories this run created for ``--out``, those left empty), so a corrected rerun is not refused. Only our
    own files are removed; a run with a checkpoint keeps everything (``--resume`` continues it)."""
    if os.path.exists(runner.ckpt_path):
        return
    for path in (os.path.join(out, MARKER), runner.ckpt_path + ".tmp"):
        if os.path.isfile(path):
            os.remove(path)
    for d in [os.path.dirname(runner.ckpt_path), *made_dirs]:   # deepest first
        if os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)


def _train_and_write(cfg: TrainConfig, P: dict, runner: Run, resume_state, log, keep, t_start: float) -> dict:
    """The training (by method), the test metric and the outputs, once ``--out`` is marked as ours."""
    tok, base, enc, steps = P["tok"], P["base"], P["enc"], P["steps"]
    targets, heads = P["targets"], P["heads"]
    sizes = {k: len(v) for k, v in P["splits"].items()}
    st = runner.state
    model = None
    allocator = None
    if cfg.method == "shaplora":
        model = _shaplora(runner, P, resume_state)
    elif cfg.method in MOE_METHODS:
        if st["experts"] is None:
            t0 = time.perf_counter()
            st["experts"], st["alphas"] = _experts(cfg, base, targets)
            st["allocation_seconds"] = time.perf_counter() - t0
        log(f"experts per block: {st['experts']}")
        model = adapt(base, cfg, targets, heads, experts=st["experts"])
        runner.train_phase("train", model, enc["train"], tok, steps, resume_state)
    elif cfg.method == "adalora":
        model = adapt(base, cfg, targets, heads)
        factory = _adalora_factory(cfg)
        t0 = time.perf_counter()
        allocator = runner.train_phase("train", model, enc["train"], tok, steps, resume_state, factory)
        pattern = allocator.rank_pattern or allocator.mask_to_budget(allocator.target_bgt)
        for name, layer in _layers(model).items():
            layer.set_rank_mask(pattern[name])
        st["final_pattern"] = {n: int(sum(k)) for n, k in pattern.items()}
        del t0
    else:
        model = adapt(base, cfg, targets, heads)
        runner.train_phase("train", model, enc["train"], tok, steps, resume_state)

    t_eval = time.perf_counter()
    test = evaluate(model, tok, enc["test"], cfg.task, cfg.batch_size)
    val = evaluate(model, tok, enc["validation"], cfg.task, cfg.batch_size)
    if not (test["finite"] and val["finite"]):   # finite weights, yet overflowing outputs: a metric of nothing
        n = len(st["losses"].get("train", []))
        raise runner.diverged("train", n, steps, "the trained model's outputs on the "
                              f"{'test' if not test['finite'] else 'validation'} split are not finite")
    eval_s = time.perf_counter() - t_eval
    total, adapters_only = active_trainable(model)
    metrics = {"method": cfg.method, "task": cfg.task, "trainable_params": total,
               "trainable_adapter_params": adapters_only, "steps": steps, "seed": cfg.seed,
               "train_seconds": round(st["train_seconds"], 3), "allocation_seconds": round(st["allocation_seconds"], 3),
               "eval_seconds": round(eval_s, 3), "splits": sizes, "truncated_texts": P["longer"],
               "final_train_loss": st["losses"]["train"][-1] if st["losses"].get("train") else None}
    if cfg.task == "classify":
        metrics.update(test_accuracy=test["accuracy"], validation_accuracy=val["accuracy"])
    else:
        metrics.update(test_perplexity=test["perplexity"], test_loss=test["loss"], test_tokens=test["tokens"],
                       validation_perplexity=val["perplexity"])
    metrics["ranks"] = _ranks(model) if cfg.method in ("shaplora", "adalora") else None
    if cfg.method == "shaplora":
        metrics["score_stability"] = st["score_stability"]
    metrics["experts_per_block"] = st["experts"]
    metrics["layer_alphas"] = st["alphas"]
    sample = _sample(model, tok, P["splits"]["test"]) if cfg.task == "causal-lm" else None
    metrics["losses"] = st["losses"]
    metrics["config"] = {**{k: v for k, v in asdict(cfg).items() if k != "extra"}, "steps_resolved": steps,
                         "targets_resolved": targets, "heads": heads, "model_fingerprint": P["ident"]["model"],
                         "alpha": 2 * (cfg.expert_r if cfg.method in MOE_METHODS else cfg.r)}
    log(_summary(metrics))
    if keep is not None:
        keep.update(model=model, tokenizer=tok)

    _write_adapters(cfg, P, model, metrics)
    if cfg.merge:
        _write_merged(cfg, P, model, metrics)
    metrics["wall_seconds"] = round(time.perf_counter() - t_start, 3)
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1, default=str)
    _write_report(cfg, P, metrics, sample)
    written = ("adapter_config.json, adapter_model.safetensors" if metrics["format"] == "peft" else f"{ADAPTER_DIR}/")
    log(f"wrote {os.path.abspath(cfg.out)}: {written}, metrics.json, report.md"
        + (f", {MERGED_DIR}/" if cfg.merge else ""))
    return metrics


def _layers(model):
    import python_api as lk
    return lk.adapter_layers(model)


def _ranks(model) -> dict[str, int]:
    return {n: m.active_rank for n, m in _layers(model).items()}


def _adalora_factory(cfg: TrainConfig):
    from ..allocators.adalora import AdaLoRAAllocator

    def make(model, steps):
        tinit, tfinal = steps // 10, steps // 5
        if tinit + tfinal >= steps:
            tinit, tfinal = 0, 0
        return AdaLoRAAllocator(model, budget=int(cfg.budget), budget_unit=cfg.budget_unit, total_step=steps,
                                tinit=tinit, tfinal=tfinal, deltaT=max(1, steps // 20))
    return make


def _experts(cfg: TrainConfig, base, targets) -> tuple[list[int], list[float | None] | None]:
    """Experts per block index, allocated over the blocks the targets reach (``--targets`` of block 1 only: one
    block); a block no target reaches gets 0 experts (apply_moe_adapters leaves it plain) and layer alpha None."""
    from ..allocators.alphalora import allocate_experts, layer_alphas, mola_experts

    blocks = sorted({_block(n) for n in targets})
    if cfg.method == "moe-uniform":
        got, alphas = mola_experts(len(blocks), int(cfg.budget), "uniform"), None
    else:
        # layer_alphas wants blocks 0..k-1: other targeted blocks are renumbered in that order (same matrices)
        alphas = layer_alphas(base, targets) if blocks == list(range(len(blocks))) else \
            layer_alphas(_renumbered(base, targets, blocks))
        got = allocate_experts(alphas, int(cfg.budget), beta=cfg.beta)
    experts = [0] * (blocks[-1] + 1)
    per_block = None if alphas is None else [None] * len(experts)
    for j, b in enumerate(blocks):
        experts[b] = int(got[j])
        if per_block is not None:
            per_block[b] = float(alphas[j])
    return experts, per_block


def _renumbered(base, targets: list[str], blocks: list[int]) -> nn.Module:
    """A holder of the target Linears (shared, not copied) as ``layers.j.<name>``, j = the position of their block
    in ``blocks``."""
    holder = nn.Module()
    holder.layers = nn.ModuleList(nn.Module() for _ in blocks)
    where = {b: j for j, b in enumerate(blocks)}
    for n in targets:
        holder.layers[where[_block(n)]].add_module(n.replace(".", "_"), base.get_submodule(n))
    return holder


def _nan_for_none(alphas):
    return None if alphas is None else [math.nan if a is None else a for a in alphas]


def _shaplora_masks(runner: Run, P: dict, resume_state=None) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """Super-network for half the steps, Shapley scores on (up to 256) validation examples, global top-budget.
    Returns the masks and the super-network (its kept ranks masked)."""
    from ..allocators.shaplora import SupernetNotLearnedError, _fit_check, _learned, shaplora_allocate

    cfg, tok, enc = runner.cfg, P["tok"], P["enc"]
    sup = adapt(P["base"], cfg, P["targets"], P["heads"])
    val = enc["validation"]
    n = min(len(val), SHAPLEY_VAL_EXAMPLES)
    batches = [collate(tok, val, list(range(i, min(i + cfg.batch_size, n))), cfg.task)
               for i in range(0, n, cfg.batch_size)]

    def loss_fn(m, b):
        return per_example_loss(m, b, cfg.task)

    def predict_fn(m, b):
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1), b["labels"]

    predict = predict_fn if cfg.task == "classify" else None
    if runner.state.get("supernet_before") is None:   # the untrained super-network (kept across a resume)
        runner.state["supernet_before"] = _fit_check(sup, batches, loss_fn, predict)
    before = runner.state["supernet_before"]
    runner.train_phase("supernet", sup, enc["train"], tok, max(1, P["steps"] // 2),
                       resume_state if resume_state is not None and resume_state["phase"] == "supernet" else None)
    # Never hand noise to the allocator: the super-network must have learned (validation loss down 5%, and for
    # classification accuracy above the majority class) before its Shapley scores mean anything.
    after = _fit_check(sup, batches, loss_fn, predict)
    if cfg.supernet_check and not _learned(before, after, 0.05):
        raise SupernetNotLearnedError(
            f"shaplora: the super-network did not learn in {max(1, P['steps'] // 2)} steps (validation {after} vs "
            f"untrained {before}); its Shapley scores would be noise. Use more --steps or a higher --lr "
            "(--no-supernet-check skips this check).")
    runner.log(f"shaplora: super-network validation loss {before['val_loss']:.4f} -> {after['val_loss']:.4f}; "
               f"scoring {n} validation examples")
    # the library's allocation step: merged basis (one player per learned direction, docs/ALGORITHMS.md §3), two
    # independent scorings (their agreement reported, a warning under 0.5), the best ranks within the budget
    alloc = shaplora_allocate(sup, batches, int(cfg.budget), loss_fn=loss_fn, budget_unit=cfg.budget_unit,
                              generator=torch.Generator().manual_seed(cfg.seed),
                              batch_size_fn=lambda b: b["input_ids"].shape[0])
    runner.state["score_stability"] = alloc["score_stability"]
    runner.log(f"shaplora: two independent scorings agree with Spearman rho {alloc['score_stability']:.2f}")
    return alloc["masks"], sup


def _shaplora(runner: Run, P: dict, resume_state) -> nn.Module:
    """The allocation (unless a resumed run has it), then the retrain: plain LoRA with the rank pattern, from a
    fresh init or (``--retrain warm``) from the super-network's kept components and head, for all the steps."""
    from ..allocators.shaplora import to_plain_lora

    cfg, st, tok, enc = runner.cfg, runner.state, P["tok"], P["enc"]
    if st["masks"] is None:
        t0 = time.perf_counter()
        st["masks"], sup = _shaplora_masks(runner, P, resume_state)
        # ShapLoRA's overhead: the super-network's training (all of it, across resumes) plus the scoring
        st["allocation_seconds"] = st.get("_sup_before", 0.0) + time.perf_counter() - t0
        st["step"] = 0
        if cfg.retrain == "warm":
            model = to_plain_lora(sup, st["masks"], warm=True)
        else:
            del sup   # before the new copy of the base: two copies in memory at a time, not three
            model = adapt(P["base"], cfg, P["targets"], P["heads"], masks=st["masks"])
        # the allocation is done: a resume starts the retraining (from the warm start, kept in the checkpoint)
        runner.save(model if cfg.retrain == "warm" else None, None, None, None)
        resume_state = None
    else:
        model = adapt(P["base"], cfg, P["targets"], P["heads"], masks=st["masks"])
        if resume_state is not None and resume_state["phase"] != "train" and cfg.retrain == "warm":
            _load_trainable(model, resume_state["trainable"])   # stopped before the retrain's first checkpoint
    if resume_state is None or resume_state["phase"] != "train":
        torch.manual_seed(cfg.seed + 2)   # the retrain's random stream: the same for a run resumed before it
        resume_state = None
    runner.train_phase("train", model, enc["train"], tok, P["steps"], resume_state)
    return model


@torch.no_grad()
def _sample(model, tok, test: byo_data.Examples, prompt_tokens: int = 8, new_tokens: int = 24) -> dict:
    text = next((t for t in test.texts if t.strip()), "")
    ids = tok(text, return_tensors="pt", truncation=True, max_length=prompt_tokens)["input_ids"][:, :prompt_tokens]
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    return {"prompt": tok.decode(ids[0], skip_special_tokens=True),
            "continuation": tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}


def _summary(m: dict) -> str:
    head = (f"test accuracy {m['test_accuracy']:.4f}" if m["task"] == "classify"
            else f"test perplexity {m['test_perplexity']:.3f}")
    return (f"{m['method']}: {head}; {m['trainable_params']:,} trainable parameters; {m['steps']} steps in "
            f"{m['train_seconds']:.1f}s; allocation {m['allocation_seconds']:.2f}s")


# ---- outputs -------------------------------------------------------------------------------------------
def _reload_base(P: dict):
    cfg = P["cfg"]
    return byo_model.load_model(P["src"], cfg.task, P["splits"]["train"].label_names or None, cfg.seed, P["tok"],
                                torch.bfloat16 if cfg.bf16 else torch.float32)


@torch.no_grad()
def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def _reload_diff(model, probe, reload) -> float:
    """Max |logit| difference on ``probe`` between ``model`` and ``reload()`` (the model rebuilt from what was
    written). The reloaded copy is dropped on return, so only one extra model is alive at a time."""
    ref = _logits(model, probe)
    fresh = reload().eval()
    return float((_logits(fresh, probe) - ref).abs().max())


def _write_adapters(cfg: TrainConfig, P: dict, model, metrics: dict) -> None:
    import python_api as lk

    out = cfg.out
    probe = collate(P["tok"], P["enc"]["test"], list(range(min(4, len(P["enc"]["test"])))), cfg.task)
    if cfg.method in PEFT_METHODS:
        task_type = "SEQ_CLS" if cfg.task == "classify" else "CAUSAL_LM"
        lk.export_peft(model, out, base_model_name_or_path=P["src"].path, task_type=task_type)
        metrics["format"] = "peft"
        if cfg.verify:
            from peft import PeftModel

            metrics["peft_reload_max_abs_diff"] = _reload_diff(
                model, probe, lambda: PeftModel.from_pretrained(_reload_base(P), out))
    else:
        path = os.path.join(out, ADAPTER_DIR)
        lk.save_adapters(model, path, seed=cfg.seed, extra={"method": cfg.method, "task": cfg.task,
                                                            "base_model": P["src"].path})
        metrics["format"] = "lora_kernels"
        if cfg.verify:
            metrics["reload_max_abs_diff"] = _reload_diff(model, probe,
                                                          lambda: lk.load_adapters(_reload_base(P), path))


def _write_merged(cfg: TrainConfig, P: dict, model, metrics: dict) -> None:
    import python_api as lk

    path = os.path.join(cfg.out, MERGED_DIR)
    probe = collate(P["tok"], P["enc"]["test"], list(range(min(4, len(P["enc"]["test"])))), cfg.task)
    ref = _logits(model, probe)
    merged = lk.merge_adapters(copy.deepcopy(model))
    if hasattr(merged, "_lora_kernels_config"):
        delattr(merged, "_lora_kernels_config")
    merged.save_pretrained(path)
    P["tok"].save_pretrained(path)
    if cfg.verify:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        cls = AutoModelForSequenceClassification if cfg.task == "classify" else AutoModelForCausalLM
        back = cls.from_pretrained(path, local_files_only=True).eval()
        metrics["merged_reload_max_abs_diff"] = float((_logits(back, probe) - ref).abs().max())


def _write_report(cfg: TrainConfig, P: dict, m: dict, sample: dict | None) -> None:
    from . import plots

    out = cfg.out
    plots_md = []
    curve = _loss_plot(m["losses"], os.path.join(out, "loss.png"))
    if curve:
        plots_md.append("![training loss](loss.png)")
    if m.get("ranks"):
        plots.rank_heatmap(m["ranks"], os.path.join(out, "ranks.png"), f"{cfg.method} ranks per module",
                           r_max=cfg.r_init)
        plots_md.append("![ranks per module](ranks.png)")
    if m.get("experts_per_block"):
        plots.expert_bars(m["experts_per_block"], _nan_for_none(m.get("layer_alphas")),
                          os.path.join(out, "experts.png"), f"{cfg.method}: experts per block")
        plots_md.append("![experts per block](experts.png)")
    head = (f"test accuracy **{m['test_accuracy']:.4f}**" if cfg.task == "classify"
            else f"test perplexity **{m['test_perplexity']:.3f}**")
    lines = [f"# lora-kernels train: {cfg.method} on {cfg.model}", "",
             "Command:", "", "```", cfg.command or "(called from Python)", "```", "",
             f"- task: {cfg.task}; data {P['info']['path']} (text {cfg.text_column!r}"
             + (f", label {cfg.label_column!r}" if cfg.label_column else "") + ")",
             "- splits: " + ", ".join(f"{k} {v}" for k, v in m["splits"].items()),
             f"- truncated to {cfg.max_length} tokens: "
             + ", ".join(f"{k} {v}" for k, v in m["truncated_texts"].items()),
             f"- result: {head}; trainable parameters {m['trainable_params']:,} "
             f"(adapters {m['trainable_adapter_params']:,})",
             f"- {m['steps']} steps, batch {cfg.batch_size}, lr {cfg.lr}, seed {cfg.seed}; "
             f"train {m['train_seconds']:.1f}s, allocation {m['allocation_seconds']:.2f}s",
             f"- output format: {m['format']}"
             + ("; PEFT reload max |Δlogits| {:.2e}".format(m["peft_reload_max_abs_diff"])
                if "peft_reload_max_abs_diff" in m else "")
             + ("; reload max |Δlogits| {:.2e}".format(m["reload_max_abs_diff"]) if "reload_max_abs_diff" in m else "")
             + ("; merged reload max |Δlogits| {:.2e}".format(m["merged_reload_max_abs_diff"])
                if "merged_reload_max_abs_diff" in m else ""), ""]
    if m.get("experts_per_block"):
        lines += [f"Experts per block: {m['experts_per_block']}", ""]
    if m.get("ranks"):
        lines += ["Ranks per module: " + ", ".join(f"{n} {r}" for n, r in m["ranks"].items()), ""]
    lines += plots_md + [""]
    if sample is not None:
        flat = " ".join(sample["continuation"].split())   # one quoted line: newlines would end the quote
        lines += ["Generated sample (greedy, prompt in bold):", "", f"> **{sample['prompt']}** {flat}", ""]
    if m["format"] == "peft":
        auto = "AutoModelForSequenceClassification" if cfg.task == "classify" else "AutoModelForCausalLM"
        lines += ["Load with PEFT:", "", "```python", f"from transformers import {auto}", "from peft import PeftModel",
                  f"base = {auto}.from_pretrained(...)  # the same base model"
                  + (f", num_labels={len(P['splits']['train'].label_names)}" if cfg.task == "classify" else ""),
                  f"model = PeftModel.from_pretrained(base, {os.path.abspath(out)!r})", "```", ""]
    else:
        lines += ["Load with lora-kernels:", "", "```python", "import python_api as lk",
                  f"model = lk.load_adapters(base, {os.path.abspath(os.path.join(out, ADAPTER_DIR))!r})"
                  "  # base: the same base model", "```", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))


def _loss_plot(losses: dict, path: str) -> str | None:
    if not any(losses.values()):
        return None
    from .plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for phase, ys in losses.items():
        if ys:
            ax.plot(range(1, len(ys) + 1), ys, label=phase, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_alloc(cfg: TrainConfig, log=print) -> dict:
    """``lora-kernels alloc --model M --data D``: the allocation step of ``train`` only (ShapLoRA super-net and
    scores, AdaLoRA's schedule, AlphaLoRA's alphas), written to ``--out`` as ``allocation.json`` and a PNG."""
    from . import plots

    if cfg.method not in ("shaplora", "adalora", "alphalora"):
        raise BadInput(f"--method: alloc takes shaplora, adalora or alphalora, got {cfg.method!r}")
    cfg.verify = False
    P = prepare(cfg, log, check_output=False)
    cfg = P["cfg"]
    out = cfg.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise BadInput(f"--out: {out} exists and is not a directory")
    names = ([f"{cfg.method}_ranks.png"] if cfg.method != "alphalora" else ["alphalora_experts.png"]) + \
        [f"{cfg.method}_allocation.json"]
    clash = [n for n in names if os.path.lexists(os.path.join(out, n))]
    if clash and not cfg.overwrite:   # checked before the allocation: nothing of the user's is replaced unasked
        raise BadInput(f"--out: {out} already holds {', '.join(clash)}, which alloc would overwrite; pass --overwrite "
                       "to replace them, or choose another directory")
    runner = Run(cfg, log)
    runner.checkpoints = False
    t0 = time.perf_counter()
    res: dict = {"method": cfg.method, "model": cfg.model, "data": os.path.abspath(cfg.data), "budget": cfg.budget}
    if cfg.method == "alphalora":
        res["experts"], res["alphas"] = _experts(cfg, P["base"], P["targets"])
    elif cfg.method == "shaplora":
        masks = _shaplora_masks(runner, P)[0]
        res["ranks"] = {n: int(m.sum()) for n, m in masks.items()}
        res["score_stability"] = runner.state["score_stability"]
    else:
        model = adapt(P["base"], cfg, P["targets"], P["heads"])
        alloc = runner.train_phase("train", model, P["enc"]["train"], P["tok"], P["steps"], None,
                                   _adalora_factory(cfg))
        pattern = alloc.rank_pattern or alloc.mask_to_budget(alloc.target_bgt)
        res["ranks"] = {n: int(sum(k)) for n, k in pattern.items()}
    res["allocation_seconds"] = round(time.perf_counter() - t0, 3)
    os.makedirs(out, exist_ok=True)
    if "ranks" in res:
        png = plots.rank_heatmap(res["ranks"], os.path.join(out, names[0]),
                                 f"{cfg.method} ranks ({cfg.model})", r_max=cfg.r_init)
        for n, r in res["ranks"].items():
            log(f"{n}: rank {r}")
    else:
        png = plots.expert_bars(res["experts"], _nan_for_none(res["alphas"]), os.path.join(out, names[0]))
        for i, (a, e) in enumerate(zip(res["alphas"], res["experts"])):
            log(f"block {i}: " + ("not targeted" if a is None else f"alpha {a:.3f} -> {e} experts"))
    js = os.path.join(out, names[-1])
    with open(js, "w") as f:
        json.dump(res, f, indent=1)
    log(f"{cfg.method} allocation in {res['allocation_seconds']:.1f}s; wrote {png} and {js}")
    return res
