"""The allocators under ``transformers.Trainer``: AdaLoRA as a ``TrainerCallback``, ShapLoRA as a thin driver.

transformers is imported only when a callback is built (:func:`adalora_callback`, or the class through the
module attribute ``AdaLoRACallback``) or the driver runs, so importing this module stays cheap.

- AdaLoRA: :meth:`AdaLoRAAllocator.update_and_allocate` needs the step's gradients, after ``optimizer.step()`` and
  before ``zero_grad()`` (as PEFT). Trainer fires ``on_optimizer_step`` right after ``optimizer.step()`` and
  zeroes the gradients after it; ``state.global_step`` is then still the 0-based index of the step (it is
  incremented after ``zero_grad``), the index a hand-written PEFT loop passes. Under gradient accumulation the
  event fires once per optimizer step, on the accumulated gradients. Under DDP every rank sees the all-reduced
  gradients, so every rank makes the same allocation.
- ShapLoRA: :func:`shaplora_with_trainer` runs :func:`~python_api.allocators.shaplora.shaplora_workflow` with one
  Trainer run for the super-network and one for the fresh, rank-masked model; the workflow's checks (budget,
  super-network learned, score stability) apply unchanged.
"""
from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..config import check_finite
from .adalora import AdaLoRAAllocator

__all__ = ["adalora_callback", "shaplora_with_trainer"]   # and AdaLoRACallback, built on first access
STATE_FILE = "lora_kernels_adalora.pt"   # the allocator's state in each Trainer checkpoint folder


@functools.cache
def _adalora_callback_class():
    from transformers import TrainerCallback

    from .shaplora import orthogonality_hooks

    class AdaLoRACallback(TrainerCallback):
        """Runs ``allocator.update_and_allocate(step)`` after every optimizer step of a ``transformers.Trainer``.

        ``orth_reg`` > 0 adds AdaLoRA's orthogonality penalty (weight γ) to the adapters' gradients during
        training (:func:`~python_api.allocators.shaplora.orthogonality_hooks`: the model's loss stays plain).
        ``history``: (step, rank pattern) for every step that masked.
        """

        def __init__(self, allocator: AdaLoRAAllocator, orth_reg: float = 0.0):
            if not isinstance(allocator, AdaLoRAAllocator):
                raise TypeError(f"allocator must be an AdaLoRAAllocator, got {type(allocator).__name__}")
            self.allocator = allocator
            self.orth_reg = check_finite("orth_reg", orth_reg, lo=0.0)
            self.history: list[tuple[int, dict[str, list[bool]]]] = []
            self._orth = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:   # the Trainer's model must hold the allocator's tensors (else it scores nothing)
                mine = {id(p) for p in model.parameters()}
                if not any(id(e) in mine for e, _, _ in self.allocator.adapters.values()):
                    raise ValueError("the Trainer's model does not hold the allocator's adapters: build the "
                                     "AdaLoRAAllocator on the model passed to the Trainer")
            if state.global_step > 0:
                self._resume(args, state)
            final = self.allocator.total_step - self.allocator.tfinal
            if state.max_steps <= final:
                raise ValueError(f"the allocator's total_step ({self.allocator.total_step}) and tfinal "
                                 f"({self.allocator.tfinal}) put the final mask at step {final}, but the Trainer "
                                 f"runs {state.max_steps} steps (0..{state.max_steps - 1}): the target budget would "
                                 "never be reached; set total_step to the Trainer's max_steps")
            if self.orth_reg > 0:
                if model is None:
                    raise ValueError("orth_reg > 0 needs the model, which the Trainer did not pass to the callback")
                # once per optimizer step: the Trainer divides each micro-batch loss by the accumulation steps
                self._orth = orthogonality_hooks(model, self.orth_reg,
                                                 backwards_per_step=max(1, int(args.gradient_accumulation_steps)))
                self._orth.__enter__()

        def _state_file(self, args, step: int) -> str:
            return os.path.join(args.output_dir, f"checkpoint-{step}", STATE_FILE)

        def _resume(self, args, state):
            # Trainer(resume_from_checkpoint=...) restored the model and optimizer, not the allocator: its state is
            # in the checkpoint folder (on_save), else the run would go on with zero EMAs, or past the final mask
            # with no mask at all (every rank back in)
            paths = [self._state_file(args, state.global_step)]
            if isinstance(getattr(args, "resume_from_checkpoint", None), str):
                paths.append(os.path.join(args.resume_from_checkpoint, STATE_FILE))
            found = next((p for p in paths if os.path.isfile(p)), None)
            if found is not None:
                self.allocator.load_state_dict(torch.load(found, weights_only=True, map_location="cpu"))
            elif self.allocator.tracker.step == 0:
                raise ValueError(f"resuming at step {state.global_step}, but the AdaLoRA allocator's state is not at "
                                 f"{paths[0]} and the allocator is fresh: load the resumed checkpoint's {STATE_FILE} "
                                 "with allocator.load_state_dict(torch.load(...)) before trainer.train(), or restart "
                                 "the run")

        def on_save(self, args, state, control, **kwargs):
            path = self._state_file(args, state.global_step)
            if getattr(args, "should_save", True) and os.path.isdir(os.path.dirname(path)):   # one writer (rank 0)
                torch.save(self.allocator.state_dict(), path)

        def on_optimizer_step(self, args, state, control, **kwargs):
            pattern = self.allocator.update_and_allocate(state.global_step)
            if pattern is not None:
                self.history.append((state.global_step, pattern))

        def on_train_end(self, args, state, control, **kwargs):
            if self._orth is not None:
                self._orth.__exit__(None, None, None)
                self._orth = None
            # load_best_model_at_end reloads (after the last step, before this call) a checkpoint that may predate
            # the final mask, with λ masked to an earlier, larger budget: the final pattern is applied again
            al = self.allocator
            final = al.total_step - al.tfinal
            if al.rank_pattern is None or state.global_step <= final:
                return
            al.apply_rank_pattern(al.rank_pattern)
            best = getattr(state, "best_model_checkpoint", None)
            step = re.search(r"checkpoint-(\d+)$", str(best or "").rstrip("/\\"))
            if getattr(args, "load_best_model_at_end", False) and step and int(step.group(1)) <= final:
                warnings.warn(f"the best checkpoint ({best}, step {step.group(1)}) predates the final AdaLoRA mask "
                              f"(step {final}): the final rank pattern was applied to it so that it keeps the "
                              "budget, and its recorded evaluation no longer describes it", stacklevel=2)

    AdaLoRACallback.__qualname__ = "AdaLoRACallback"   # importable by name (module __getattr__), pickles
    return AdaLoRACallback


def adalora_callback(allocator: AdaLoRAAllocator, orth_reg: float = 0.0):
    """An ``AdaLoRACallback`` for ``Trainer(callbacks=[...])``. ``allocator.total_step`` should be the
    Trainer's ``max_steps`` (checked at the start of training: the final mask must fall inside the run)."""
    return _adalora_callback_class()(allocator, orth_reg)


def __getattr__(name: str):
    if name == "AdaLoRACallback":
        return _adalora_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _same_masks_everywhere(model: nn.Module) -> None:
    """Under torch.distributed, refuse to train ranks whose rank patterns differ (each rank scored its own
    validation batches, or built a different super-network): DDP would average gradients of different models."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    from ..distributed import same_on_all_ranks
    from ..surgery import adapter_layers
    pattern = {n: m.rank_mask.tolist() for n, m in adapter_layers(model).items()}
    if not same_on_all_ranks(pattern):
        raise RuntimeError("the ShapLoRA rank pattern differs between ranks: give every rank the same "
                           "val_batches and a build_model that is deterministic (seeded)")


def shaplora_with_trainer(
    build_model: Callable[[], nn.Module],
    make_trainer: Callable[[nn.Module], Any],
    val_batches: Iterable,
    evaluate: Callable[[nn.Module], Any] | None = None,
    **workflow_kwargs,
) -> dict:
    """ShapLoRA with ``transformers.Trainer`` doing the training: super-network (SVD form at r_init) → learned
    check → Shapley scores → global top-``budget`` ranks → a FRESH model with that rank pattern, retrained.

    Args:
        build_model: a new model with SVD-form adapters at r_init (``svd=True``); seeded, so every call and
            every rank builds the same one.
        make_trainer: ``model -> transformers.Trainer`` for that model (called once per training run: the
            super-network, any extra run the learned check asks for, the retrain); its ``train()`` is run.
        val_batches: validation batches for scoring (not the training split; the same on every rank).
        evaluate: ``trained model -> result`` (default: none, the result is None).
        workflow_kwargs: :func:`~python_api.allocators.shaplora.shaplora_workflow`'s keywords: ``loss_fn`` and
            one of ``budget`` / ``r_target`` are required.
    Returns: the workflow's dict (``masks``, ``scores``, ``model``, ``supernet``, ...), plus ``trainers``: every
    Trainer that ran, in order (the last one trained the returned model).
    Under torch.distributed each rank runs the same workflow; before every Trainer run the ranks' rank patterns
    are compared (one all-gather) and a RuntimeError is raised if they differ.
    """
    from .shaplora import shaplora_workflow

    if not callable(make_trainer):
        raise TypeError(f"make_trainer must be a callable model -> Trainer, got {type(make_trainer).__name__}")
    trainers = []

    def train(model: nn.Module) -> None:
        _same_masks_everywhere(model)
        trainer = make_trainer(model)
        if not callable(getattr(trainer, "train", None)):
            raise TypeError(f"make_trainer must return a Trainer (with train()), got {type(trainer).__name__}")
        trainers.append(trainer)
        trainer.train()

    out = shaplora_workflow(build_model, train, val_batches, evaluate or (lambda model: None), **workflow_kwargs)
    out["trainers"] = trainers
    return out
