"""SensitivityTracker: AdaLoRA-style per-rank sensitivity for every adapter of a model, one fused op per step.

State is two flat fp32 buffers (Ī, Ū) with one view per adapter tensor, so the torch path runs a handful of
ops over the whole model and the Triton/CUDA paths one multi-tensor launch (ALGORITHMS.md §2).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from lora_kernels.sensitivity import KIND_A, KIND_B, KIND_E, SensitivityPlan
from lora_kernels.sensitivity.op import SENS_BAD_PARAM, SENS_OK

from ..config import check_finite
from ..surgery import adapter_layers

Triplet = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]  # (λ [R] or [R,1] or None, A [R,K], B [N,R])


def find_adapters(model: nn.Module) -> dict[str, Triplet]:
    """Module name → (lora_E or None, lora_A, lora_B) for every :class:`LoRALinear` in ``model``.
    A shared A/B (ShareLoRA) appears under every module that uses it."""
    out = {name: (m.lora_E, m.lora_A, m.lora_B) for name, m in adapter_layers(model).items()}
    if not out:
        raise ValueError(f"model ({type(model).__name__}) contains no LoRALinear layer")
    return out


class SensitivityTracker:
    """Holds Ī, Ū for every adapter entry; :meth:`update` after ``backward()`` refreshes them and the
    per-rank triplet scores ``S_i = s(λ_i) + mean_k s(A_ik) + mean_n s(B_ni)``.

    Args:
        adapters: a model (every :class:`LoRALinear` is tracked) or a dict module name → (λ, A, B) with
            λ [R] / [R, 1] / None, A [R, K], B [N, R] (e.g. a PEFT AdaLoRA model's tensors).
        beta1, beta2: EMA factors (0.85 as AdaLoRA / PEFT).

    Non-finite gradients (a skipped fp16 step) or non-finite adapter weights (a diverged step: |w·g| would be
    NaN and stay in the EMAs for good) leave the state untouched; they are counted in :attr:`skipped_steps` and,
    on CPU, a RuntimeWarning names the update and, for weights, the modules (on GPU the step is skipped without a
    host sync, so without a warning).
    """

    def __init__(self, adapters: nn.Module | dict[str, Triplet], beta1: float = 0.85, beta2: float = 0.85):
        triplets = find_adapters(adapters) if isinstance(adapters, nn.Module) else dict(adapters)
        if not triplets:
            raise ValueError("adapters is empty: nothing to track")
        beta1 = check_finite("beta1", beta1, lo=0.0, hi=1.0)
        beta2 = check_finite("beta2", beta2, lo=0.0, hi=1.0)
        self.beta1, self.beta2 = beta1, beta2
        self.names: list[str] = list(triplets)
        self.ranks: dict[str, int] = {}
        self._tensors: list[torch.Tensor] = []   # the Parameters, in update order
        self._owner: list[str] = []               # module name of each tensor, for the warnings
        self.kinds: list[int] = []
        self.offsets: list[int] = []
        off = 0
        for name in self.names:
            trip = triplets[name]
            if not isinstance(trip, (tuple, list)) or len(trip) != 3:
                raise TypeError(f"adapter {name!r}: expected a (λ or None, A, B) triplet of tensors, got "
                                f"{type(trip).__name__}")
            e, a, b = trip
            for what, t in (("λ", e), ("A", a), ("B", b)):
                if not (t is None and what == "λ") and not isinstance(t, torch.Tensor):
                    raise TypeError(f"adapter {name!r}: {what} must be a tensor (a Parameter of the adapter), got "
                                    f"{type(t).__name__}")
            if a.dim() != 2:
                raise ValueError(f"adapter {name!r}: A must be 2-D [r, in_features], got shape {tuple(a.shape)}")
            r = a.shape[0]
            if b.dim() != 2 or b.shape[1] != r or (e is not None and e.numel() != r):
                raise ValueError(f"adapter {name!r}: shapes λ {None if e is None else tuple(e.shape)}, "
                                 f"A {tuple(a.shape)}, B {tuple(b.shape)} do not form rank-{r} triplets")
            for t, k in ((e, KIND_E), (a, KIND_A), (b, KIND_B)):
                if t is not None:
                    self._owner.append(name)
                    self._tensors.append(t)
                    self.kinds.append(k)
                    self.offsets.append(off)
            self.ranks[name] = r
            off += r
        self.total_rank = off
        device = self._tensors[0].device
        n = sum(t.numel() for t in self._tensors)
        self._ipt_flat = torch.zeros(n, dtype=torch.float32, device=device)
        self._unc_flat = torch.zeros(n, dtype=torch.float32, device=device)
        self.ipt, self.unc = self._views(self._ipt_flat), self._views(self._unc_flat)
        self.scores = torch.zeros(off, dtype=torch.float32, device=device)   # [total_R], last update's
        self.step = 0
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)   # device counter: no sync
        self._wkey: list | None = None            # (data_ptr, dtype, shape) of each weight: see _weights_flat
        self._wviews: list[torch.Tensor | None] = []
        # Validated once; per step only cheap checks (the full check cost more than the CPU update itself).
        self._plan = SensitivityPlan([t.detach() for t in self._tensors], self.ipt, self.unc, self.kinds,
                                     self.offsets, off)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, pos = [], 0
        for t, k in zip(self._tensors, self.kinds):
            shape = (t.numel(),) if k == KIND_E else tuple(t.shape)
            out.append(flat[pos: pos + t.numel()].view(shape))
            pos += t.numel()
        return out

    def _weights_flat(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Every tracked weight in one flat tensor (a copy made by one ``cat``). The flat views it concatenates
        are cached while the weights keep their storage, shape and dtype (checked per step: building 108 views
        costs as much as the copy)."""
        key = [(p.data_ptr(), p.dtype, p.shape) for p in params]
        if key != self._wkey:
            self._wkey = key
            self._wviews = [p.detach().view(-1) if p.is_contiguous() else None for p in params]
        views = [v if v is not None else p.detach().reshape(-1) for v, p in zip(self._wviews, params)]
        return torch.cat(views)   # mixed dtypes promote (bf16 + fp32 → fp32, anything + fp64 → fp64): exact

    @property
    def skipped_steps(self) -> int:
        """Number of updates skipped: a non-finite gradient or weight, or no gradient at all."""
        return int(self._skipped)

    @torch.no_grad()
    def update(self) -> torch.Tensor:
        """Reads every tracked tensor's ``.grad`` (None counts as zero) and updates state and scores. An update
        where no tensor has a gradient at all is skipped with a warning.

        Returns the 0-dim bool "skipped" flag (True: some gradient or weight was NaN/Inf, or no tensor had a
        gradient; nothing changed).
        """
        params = self._tensors  # only read (no_grad): no detach() per tensor
        if all(t.grad is None for t in params):
            # nothing to learn from: the loop zeroed the gradients (set_to_none) before this update, or ran no
            # backward. Counted as zeros this would decay every score toward 0 and a later mask would cut blindly.
            self._skipped += 1
            warnings.warn(f"SensitivityTracker: no tracked adapter tensor has a gradient at update {self.step} "
                          "(update_and_allocate must run after loss.backward() and before optimizer.zero_grad()); "
                          f"state left untouched ({self.skipped_steps} skipped so far)", RuntimeWarning,
                          stacklevel=3)
            self.step += 1
            return torch.tensor(True)
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in self._tensors]
        # A non-finite weight makes |w·g| NaN for good, so weights are checked as well as gradients. On CPU the
        # native loop does both in its pre-pass (one call, no extra pass in Python).
        new = torch.zeros_like(self.scores)
        code = self._plan.update_checked(params, grads, new, self.beta1, self.beta2)
        if code is not None:
            self.step += 1
            if code == SENS_OK:
                self.scores = new
                return torch.tensor(False)
            if code == SENS_BAD_PARAM:
                return self._skip_bad_weight(params)
            return self._skip_bad_grad()
        # Otherwise the op checks the gradients only and the weights are checked here: min and max of all of them
        # in one pass over one flat copy (exact: no overflow, NaN propagates; ~0.3 ms on MiniLM's 108 tensors,
        # where a per-tensor _foreach_norm(inf) cost 2.5 ms, more than the native update itself).
        wbad = ~torch.isfinite(torch.stack(torch.aminmax(self._weights_flat(params)))).all()
        if wbad.device.type == "cpu" and bool(wbad):
            self.step += 1
            return self._skip_bad_weight(params)
        if wbad.device.type != "cpu":  # no host sync: a NaN in one gradient makes the op skip the whole step
            grads[0] = grads[0] + torch.where(wbad, float("nan"), 0.0).to(grads[0].dtype)
        bad = self._plan(params, grads, new, self.beta1, self.beta2)
        self.step += 1
        if bad.device.type != "cpu":  # no host sync on GPU
            self.scores = torch.where(bad, self.scores, new)
            self._skipped += bad.to(torch.int64)
        elif not bool(bad):
            self.scores = new
        else:
            return self._skip_bad_grad()
        return bad

    def _skip_bad_weight(self, params: list[torch.Tensor]) -> torch.Tensor:
        self._skipped += 1
        mods = sorted({self._owner[j] for j, w in enumerate(params) if not bool(torch.isfinite(w).all())})
        warnings.warn(f"SensitivityTracker: non-finite weight in modules {mods} at update {self.step}; state "
                      f"left untouched ({self.skipped_steps} skipped so far)", RuntimeWarning, stacklevel=3)
        return torch.tensor(True)

    def _skip_bad_grad(self) -> torch.Tensor:
        self._skipped += 1
        warnings.warn(f"SensitivityTracker: non-finite gradient at update {self.step}; state left untouched "
                      f"({self.skipped_steps} skipped so far)", RuntimeWarning, stacklevel=3)
        return torch.tensor(True)

    def rank_scores(self) -> dict[str, torch.Tensor]:
        """Module name → triplet score [R] from the latest update (a copy)."""
        out, off = {}, 0
        for name in self.names:
            r = self.ranks[name]
            out[name] = self.scores[off: off + r].clone()
            off += r
        return out

    def reset(self) -> None:
        """Zeroes Ī, Ū and the scores (PEFT's ``reset_ipt``); step and skip counters are kept."""
        self._ipt_flat.zero_()
        self._unc_flat.zero_()
        self.scores.zero_()

    def state_dict(self) -> dict:
        return {"ipt": self._ipt_flat.clone(), "unc": self._unc_flat.clone(), "scores": self.scores.clone(),
                "step": self.step, "skipped": self._skipped.clone(), "names": list(self.names),
                "ranks": dict(self.ranks), "beta1": self.beta1, "beta2": self.beta2}

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict` bit-exactly; the adapters' names and ranks must match."""
        if list(state["names"]) != self.names or dict(state["ranks"]) != self.ranks:
            raise ValueError(f"state is for modules {state['names']} with ranks {state['ranks']}, "
                             f"this tracker has {self.names} with {self.ranks}")
        if state["ipt"].shape != self._ipt_flat.shape:
            raise ValueError(f"state ipt has {state['ipt'].numel()} entries, expected {self._ipt_flat.numel()}")
        saved = (float(state["beta1"]), float(state["beta2"]))
        if saved != (self.beta1, self.beta2):   # the EMA constants are the run's, not a part of its state to adopt
            raise ValueError(f"state was saved with beta1={saved[0]}, beta2={saved[1]}; this tracker has "
                             f"beta1={self.beta1}, beta2={self.beta2}: build it with the saved values to resume")
        # Copy in place: the per-tensor views (the fused op's fast path) must keep pointing at the buffers.
        self._ipt_flat.copy_(state["ipt"])
        self._unc_flat.copy_(state["unc"])
        self.scores = state["scores"].to(self.scores.device, torch.float32).clone()
        self.step = int(state["step"])
        self._skipped = torch.as_tensor(state["skipped"], dtype=torch.int64, device=self.scores.device).clone()
        self.beta1, self.beta2 = float(state["beta1"]), float(state["beta2"])
