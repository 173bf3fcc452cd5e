"""AdaLoRA baseline: cubic budget schedule, masking every ΔT with revival, orthogonality regulariser.

Follows PEFT's ``AdaLoraModel.update_and_allocate`` / ``RankAllocator`` step for step (ALGORITHMS.md §2;
tests/python_api/test_adalora.py checks agreement on the same weights and gradients):
- steps ``t < T − t_f``: update Ī, Ū (one fused op for the whole model); at mask steps zero every λ whose
  triplet score is ≤ the (init_bgt − budget)-th smallest score. Masked λ stay trainable, so a later
  gradient step can revive them and the next mask may keep them.
- ``t = T − t_f``: final mask to the target budget from the current scores, then reset Ī, Ū.
- ``t > T − t_f``: re-apply that final pattern every step.
"""
from __future__ import annotations

import numbers
import warnings

import torch
from torch import nn

from ..surgery import adapter_layers
from .sensitivity import SensitivityTracker, Triplet, find_adapters
from .shaplora import BUDGET_UNITS, check_budget, select_within_budget


def budget_schedule(step: int, init_bgt: int, target_bgt: int, total_step: int, tinit: int, tfinal: int,
                    deltaT: int) -> tuple[int, bool]:
    """``(budget b(t), whether to mask at t)``: b0 until t_i, cubic decrease, then b_T (PEFT's formula)."""
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul ** 3) + target_bgt), step % deltaT == 0


def orthogonality_penalty(adapters: nn.Module | dict[str, Triplet]) -> torch.Tensor:
    """``mean over A and B matrices of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F`` (PEFT's AdaLoRA regulariser, before
    its weight γ). A: [R, K], B: [N, R]. Differentiable; a shared matrix is counted once per module."""
    trip = find_adapters(adapters) if isinstance(adapters, nn.Module) else adapters
    terms = []
    for _, a, b in trip.values():
        for cov in (a @ a.T, b.T @ b):
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            terms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
    return torch.stack(terms).mean()


class AdaLoRAAllocator:
    """AdaLoRA rank allocation over a model's SVD-form adapters (λ must exist for every module).

    Call :meth:`update_and_allocate` after ``optimizer.step()`` and before ``zero_grad()`` (as PEFT).
    ``rank_pattern``: module name → bool list of kept ranks (the latest mask).
    """

    def __init__(self, adapters: nn.Module | dict[str, Triplet], target_r: int | None = None,
                 total_step: int | None = None, tinit: int = 0, tfinal: int = 0, deltaT: int = 1,
                 beta1: float = 0.85, beta2: float = 0.85, *, budget: int | None = None,
                 budget_unit: str = "ranks"):
        """``target_r`` (PEFT's: budget = target_r × #modules) or ``budget``: exactly one of them. ``budget`` counts
        ranks kept (``budget_unit="ranks"``, any integer) or the trainable parameters they keep
        (``budget_unit="params"``: a rank of module n costs ``in + out + 1``, its rows of A and B and its λ); with
        parameters the cubic schedule runs from every rank's parameters down to ``budget`` and each mask keeps the
        best-scoring ranks that fit (:func:`~python_api.allocators.shaplora.select_within_budget`)."""
        if budget_unit not in BUDGET_UNITS:
            raise ValueError(f"budget_unit must be one of {BUDGET_UNITS}, got {budget_unit!r}")
        if target_r is not None and budget_unit != "ranks":
            raise ValueError("target_r counts ranks: pass budget=... with budget_unit='params'")
        if (target_r is None) == (budget is None):
            raise ValueError("give exactly one of target_r (ranks per module) and budget (total ranks), got "
                             f"target_r={target_r!r}, budget={budget!r}")
        if budget is None:
            check_budget(target_r, 1, 1 << 62, name="target_r")
        else:
            check_budget(budget, 1, 1 << 62)
        trip = find_adapters(adapters) if isinstance(adapters, nn.Module) else dict(adapters)
        missing = [n for n, (e, _, _) in trip.items() if e is None]
        if missing:
            raise ValueError(f"AdaLoRA needs SVD-form adapters (lora_E); modules without it: {missing}")
        for name, v, lo in (("total_step", total_step, 1), ("tinit", tinit, 0), ("tfinal", tfinal, 0),
                            ("deltaT", deltaT, 1)):
            # an int: a float step count was truncated in silence, and a negative tfinal put the final mask
            # after the last step (the budget was never reached)
            if isinstance(v, bool) or not hasattr(v, "__index__") or int(v) < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if tinit + tfinal >= total_step:
            raise ValueError(f"tinit + tfinal ({tinit} + {tfinal}) must be < total_step ({total_step})")
        self.adapters = trip
        # the layers, when given a model: a mask must not change λ under a merged weight (it would not take effect)
        self._layers = adapter_layers(adapters) if isinstance(adapters, nn.Module) else {}
        self.tracker = SensitivityTracker(trip, beta1, beta2)
        self.budget_unit = budget_unit
        self.costs = None
        if budget_unit == "params":
            # per rank, in the tracker's flat order: A's row + B's column + λ
            per_rank = {n: trip[n][1].shape[1] + trip[n][2].shape[0] + 1 for n in self.tracker.names}
            self.costs = torch.cat([torch.full((self.tracker.ranks[n],), per_rank[n], dtype=torch.long)
                                    for n in self.tracker.names])
            self.init_bgt = int(self.costs.sum())
            self.target_bgt = check_budget(budget, int(self.costs.min()), self.init_bgt,
                                           f"the parameters of one rank up to all {self.tracker.total_rank} ranks")
        elif budget is None:
            self.init_bgt = self.tracker.total_rank
            self.target_bgt = check_budget(int(target_r) * len(trip), 1, self.init_bgt, "the initial ranks",
                                           "target budget target_r·modules")
        else:
            self.init_bgt = self.tracker.total_rank
            self.target_bgt = check_budget(budget, 1, self.init_bgt, f"the {self.init_bgt} initial ranks")
        self.total_step, self.tinit, self.tfinal, self.deltaT = int(total_step), int(tinit), int(tfinal), int(deltaT)
        self.rank_pattern: dict[str, list[bool]] | None = None
        self._final_applied = False        # the target budget's mask was applied (at or after the final step)
        self._last_step: int | None = None  # the last step given, to refuse one that goes back

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        return budget_schedule(step, self.init_bgt, self.target_bgt, self.total_step, self.tinit, self.tfinal,
                               self.deltaT)

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zeroes λ of every triplet outside the ``budget`` best scores (a parameter budget: outside the best ones
        that fit in ``budget``); returns the pattern."""
        self._check_unmerged()
        scores = self.tracker.scores
        if self.costs is not None:
            keep = select_within_budget(scores.detach().double().cpu(), int(budget), self.costs).to(scores.device)
        elif budget >= self.init_bgt:
            keep = torch.ones_like(scores, dtype=torch.bool)
        else:
            # the ``budget`` best triplets, ties broken by position. PEFT zeroes every score ≤ the k-th smallest,
            # which is the same set without ties but keeps fewer than the budget when the threshold is tied (all
            # scores 0 after a run of None gradients or skipped steps: it would mask every rank)
            order = torch.argsort(scores, descending=True, stable=True)[:budget]
            keep = torch.zeros_like(scores, dtype=torch.bool).index_fill_(0, order, True)
        # One host copy of the mask; only modules that lose a rank are touched (a per-module masked_fill_ and
        # tolist() cost ~1.7 ms per step on MiniLM-L6's 36 modules, more than the fused sensitivity update).
        flags = keep.tolist()
        pattern, off = {}, 0
        for name in self.tracker.names:
            r = self.tracker.ranks[name]
            pattern[name] = row = flags[off: off + r]
            if not all(row):
                e = self.adapters[name][0]
                e.masked_fill_(~keep[off: off + r].view(e.shape), 0.0)
            off += r
        return pattern

    @torch.no_grad()
    def apply_rank_pattern(self, pattern: dict[str, list[bool]]) -> None:
        self._check_unmerged()
        for name, keep in pattern.items():
            e = self.adapters[name][0]
            e.masked_fill_(~torch.tensor(keep, device=e.device).view(e.shape), 0.0)

    def update_and_allocate(self, step: int) -> dict[str, list[bool]] | None:
        """One AdaLoRA step; returns the rank pattern when a mask was applied this step, else None.

        ``step`` is the global step (counted across epochs, never decreasing). The final mask (the target budget)
        is applied at step ``total_step - tfinal``, or, when that step is never given (steps counted in strides, e.g.
        per micro-batch), at the first step past it, with a warning."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be an int (the global step), got {type(step).__name__} {step!r}")
        if step < 0:
            raise ValueError(f"step must be >= 0 (the global step), got {step}")
        step = int(step)
        if self._last_step is not None and step < self._last_step:
            raise ValueError(f"update_and_allocate({step}): the step went back from {self._last_step}; pass the "
                             "global step, counted across epochs (a step counter reset each epoch would repeat the "
                             "budget schedule)")
        self._last_step = step
        final = self.total_step - self.tfinal
        # this allocator has scores to mask with: it saw earlier steps (or a restored state did)
        seen = self.rank_pattern is not None or self.tracker.step > 0
        if step > final and not self._final_applied and seen:
            warnings.warn(f"update_and_allocate({step}): the final mask step {final} was never given (the steps skip "
                          f"it); the target budget is applied now, at step {step}", RuntimeWarning, stacklevel=2)
            step = final
        if step < final:
            self.tracker.update()
            budget, mask_ind = self.budget_schedule(step)
            if mask_ind:
                self.rank_pattern = self.mask_to_budget(budget)
                return self.rank_pattern
            return None
        if step == final and not self._final_applied:
            self.rank_pattern = self.mask_to_budget(self.budget_schedule(step)[0])
            self.tracker.reset()
            self._final_applied = True
            return self.rank_pattern
        if self.rank_pattern is None:
            raise RuntimeError(f"update_and_allocate({step}): past the final mask step {final} with no final mask: "
                               f"step {final} was never given to this allocator (a fresh allocator on a resumed run? "
                               "restore its state_dict), so the target budget was never applied")
        self.apply_rank_pattern(self.rank_pattern)
        return None

    def _spend(self, pattern: dict[str, list[bool]]) -> int:
        """What ``pattern`` keeps, in the budget's unit (ranks, or with ``costs`` parameters)."""
        flags = torch.tensor([k for n in self.tracker.names for k in pattern.get(n, [])], dtype=torch.bool)
        if self.costs is not None and flags.numel() == self.costs.numel():
            return int(self.costs[flags].sum())
        return int(flags.sum())

    def _check_unmerged(self) -> None:
        merged = [n for n, m in self._layers.items() if getattr(m, "merged", False)]
        if merged:
            raise RuntimeError(f"AdaLoRA masks λ, which a merged layer does not read: unmerge() {merged[:4]} first")

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict(), "rank_pattern": self.rank_pattern,
                "final_applied": self._final_applied,
                "schedule": {"init_bgt": self.init_bgt, "target_bgt": self.target_bgt, "total_step": self.total_step,
                             "tinit": self.tinit, "tfinal": self.tfinal, "deltaT": self.deltaT,
                             **({"budget_unit": "params"} if self.costs is not None else {})}}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()["schedule"]
        if state["schedule"] != mine:
            raise ValueError(f"allocator state has schedule {state['schedule']}, this allocator has {mine}")
        self.tracker.load_state_dict(state["tracker"])
        self.rank_pattern = None if state["rank_pattern"] is None else {k: list(v) for k, v in
                                                                          state["rank_pattern"].items()}
        # a state saved before this flag existed: its pattern is the final one when it spends no more than the
        # target budget (every mask before the final step keeps more)
        self._final_applied = bool(state["final_applied"]) if "final_applied" in state else (
            self.rank_pattern is not None and self._spend(self.rank_pattern) <= self.target_bgt)
        self._last_step = None


def peft_adapters(model: nn.Module, adapter_name: str = "default") -> dict[str, Triplet]:
    """Module name → (λ [R,1], A [R,K], B [N,R]) of a PEFT AdaLoRA model, so this package's tracker and
    allocator can run on PEFT's own tensors (agreement tests, benchmarks)."""
    out = {}
    for name, m in model.named_modules():
        e = getattr(m, "lora_E", None)
        if isinstance(e, nn.ParameterDict) and adapter_name in e:
            out[name] = (e[adapter_name], m.lora_A[adapter_name], m.lora_B[adapter_name])
    if not out:
        raise ValueError(f"no PEFT AdaLoRA layer with adapter {adapter_name!r} in {type(model).__name__}")
    return out
