"""The sensitivity op, whole: batched AdaLoRA-style update over every adapter tensor of a model
(docs/ALGORITHMS.md §2). Validation once here; backends assume valid input.

For every element w of every adapter tensor, with gradient g (β1 = β2 = 0.85 by default):
    I = |w·g|
    Ī ← β1·Ī + (1−β1)·I
    Ū ← β2·Ū + (1−β2)·|I − Ī|        # the UPDATED Ī, as PEFT's RankAllocator.update_ipt does
    s = Ī·Ū
and per rank i of the module the adapter belongs to (PEFT's ``mask_to_budget`` triplet score):
    S_i = s(λ_i) + mean_k s(A_ik) + mean_n s(B_ni)

Adapter kinds: 0 = λ (E) [R], 1 = A [R, K], 2 = B [N, R].

Backends (one signature, see :func:`fused_sensitivity_update`), picked by :mod:`lora_kernels.dispatch`:
``native`` (:mod:`.native_cpu`, the one-pass loop of the compiled CPU module; auto's first choice on CPU),
``torch`` (:mod:`.reference`), ``triton`` (:mod:`.triton`, a pointer-table multi-tensor kernel) and ``cuda``
(:mod:`.cuda`). A step whose gradients contain NaN/Inf leaves every state and score untouched and returns True
(as a 0-dim bool tensor, so GPU callers need no host sync). ``LORA_KERNELS_BACKEND=torch`` forces the reference.
"""
from __future__ import annotations

import numbers

import torch

from ..codes import FLOAT_DTYPES, KIND_A, KIND_B, KIND_E
from ..dispatch import LazyBackend, Problem, reference_backend, select
from . import native_cpu, reference

__all__ = ["fused_sensitivity_update", "SensitivityPlan", "per_example_gate_grad", "check_sensitivity_args",
           "ranks_of", "KIND_E", "KIND_A", "KIND_B"]


def ranks_of(kind: int, shape: tuple[int, ...]) -> int:
    """Number of ranks R of an adapter tensor of this kind and shape."""
    return shape[0] if kind in (KIND_E, KIND_A) else shape[1]


def check_sensitivity_args(params, grads, ipt, unc, kinds, score_offsets, scores, beta1, beta2) -> None:
    """Validates the arguments of :func:`fused_sensitivity_update`; errors name the argument and value."""
    n = len(params)
    for name, lst in (("grads", grads), ("ipt", ipt), ("unc", unc), ("kinds", kinds),
                      ("score_offsets", score_offsets)):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} entries but params has {n}")
    if not isinstance(scores, torch.Tensor) or scores.dtype != torch.float32 or scores.dim() != 1:
        got = getattr(scores, "dtype", type(scores).__name__)
        raise TypeError(f"scores must be a 1-D float32 tensor [total_R], got {got} shape "
                        f"{tuple(getattr(scores, 'shape', ()))}")
    if not scores.is_contiguous():
        raise ValueError("scores must be contiguous (it is accumulated into in place)")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= float(b) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {b}")
    for j in range(n):
        p, g, a, u, k, off = params[j], grads[j], ipt[j], unc[j], kinds[j], score_offsets[j]
        if k not in (KIND_E, KIND_A, KIND_B):
            raise ValueError(f"kinds[{j}] must be 0 (E [R]), 1 (A [R,K]) or 2 (B [N,R]), got {k!r}")
        want = 1 if k == KIND_E else 2
        for name, t in (("params", p), ("grads", g)):
            if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{name}[{j}] must be a floating tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            if t.dim() != want:
                raise ValueError(f"{name}[{j}] (kind {k}) must have {want} dims, got shape {tuple(t.shape)}")
            if t.device != scores.device:
                raise ValueError(f"{name}[{j}] is on {t.device} but scores is on {scores.device}")
        if g.shape != p.shape:
            raise ValueError(f"grads[{j}] has shape {tuple(g.shape)} but params[{j}] has {tuple(p.shape)}")
        if p.numel() == 0:   # an adapter has r >= 1 and K, N >= 1: the backends disagree on empty tensors
            raise ValueError(f"params[{j}] (kind {k}) has no elements (shape {tuple(p.shape)}): an adapter tensor has "
                             "at least one rank and one feature")
        for name, t in (("ipt", a), ("unc", u)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.shape != p.shape:
                raise TypeError(f"{name}[{j}] must be float32 with shape {tuple(p.shape)}, got "
                                f"{getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}")
            if not t.is_contiguous() or t.device != scores.device:
                raise ValueError(f"{name}[{j}] must be contiguous and on {scores.device} (state is updated in place)")
        r = ranks_of(k, tuple(p.shape))
        if not isinstance(off, int) or off < 0 or off + r > scores.numel():
            raise ValueError(f"score_offsets[{j}]={off!r} with R={r} does not fit scores of length {scores.numel()}")


class SensitivityPlan:
    """Repeated :func:`fused_sensitivity_update` calls over the same tensors and state, validated once.

    Per step only cheap checks run (shape, dtype, device, contiguity of each ``params``/``grads``): the full
    argument check costs ~1.5 ms per step for the 108 tensors of MiniLM-L6, more than the native update.
    Any step the native loop cannot take falls back to :func:`fused_sensitivity_update` (full checks, dispatch).

    Args:
        params: the tensors as they will be passed each step; kind 0 may be [R] or [R, 1] (PEFT's λ).
        ipt, unc: fp32 state, one contiguous tensor per param with its logical shape ([R], [R, K], [N, R]).
        kinds, score_offsets: as :func:`fused_sensitivity_update`.
        n_scores: length of the ``scores`` vector each call receives.
    """

    def __init__(self, params, ipt, unc, kinds, score_offsets, n_scores: int):
        logical = [p.reshape(-1) if k == KIND_E else p for p, k in zip(params, kinds)]
        dev = params[0].device if params else torch.device("cpu")
        check_sensitivity_args(logical, logical, ipt, unc, kinds, score_offsets,
                               torch.empty(n_scores, device=dev), 0.5, 0.5)
        self.shapes = [p.shape for p in params]
        self.ipt, self.unc = list(ipt), list(unc)
        self.kinds, self.offsets, self.n_scores = list(kinds), list(score_offsets), int(n_scores)
        self._state_cpu = all(t.is_cpu for t in self.ipt + self.unc)
        # The native loop's table, static columns filled once; each step writes the w/g pointers and dtypes
        # through a numpy view (three column stores instead of building a 108 x 9 tensor from tuples).
        self._table = native_cpu._native_table(self.ipt, self.unc, self.kinds, self.offsets)
        self._np = self._table.numpy()

    def _fill(self, params, grads, scores: torch.Tensor, beta1: float, beta2: float) -> bool:
        """Writes this step's pointers into the native table; False when the native loop cannot run the step."""
        n = len(self.shapes)
        if not (n and self._state_cpu and scores.is_cpu and scores.numel() == self.n_scores
                and scores.dtype is torch.float32 and scores.is_contiguous() and 0.0 <= beta1 < 1.0
                and 0.0 <= beta2 < 1.0 and _native_selected(params[0].dtype)):
            return False
        pp, gp, codes = [], [], []
        for p, g, shape in zip(params, grads, self.shapes):
            code = native_cpu.NATIVE_DTYPES.get(p.dtype)
            if (code is None or g.dtype is not p.dtype or p.shape != shape or g.shape != shape or not p.is_cpu
                    or not g.is_cpu or not p.is_contiguous() or not g.is_contiguous()):
                return False
            pp.append(p.data_ptr())
            gp.append(g.data_ptr())
            codes.append(code)
        native_cpu._fill_native(self._np, pp, gp, codes)
        return True

    def _check_counts(self, params, grads) -> None:
        n = len(self.shapes)
        if len(params) != n or len(grads) != n:
            raise ValueError(f"the plan covers {n} tensors, got {len(params)} params and {len(grads)} grads")

    def __call__(self, params, grads, scores: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
        """Same as :func:`fused_sensitivity_update` over this plan's state; returns the 0-dim bool flag."""
        self._check_counts(params, grads)
        if self._fill(params, grads, scores, beta1, beta2):
            mod = native_cpu.cpu_module.require()
            return torch.tensor(native_cpu.native_update(mod, self._table.data_ptr(), len(self.shapes),
                                                         scores.data_ptr(), self.n_scores, float(beta1),
                                                         float(beta2), native_cpu.NATIVE_THREADS))
        flat = [(p.reshape(-1), g.reshape(-1)) if k == KIND_E else (p, g) for p, g, k in zip(params, grads, self.kinds)]
        return fused_sensitivity_update([p for p, _ in flat], [g for _, g in flat], self.ipt, self.unc, self.kinds,
                                        self.offsets, scores, beta1, beta2)

    def update_checked(self, params, grads, scores: torch.Tensor, beta1: float, beta2: float) -> int | None:
        """The step with the weights checked for NaN/Inf too, in the native loop's pre-pass: returns
        ``SENS_OK`` (0, updated), ``SENS_BAD_GRAD`` (1) or ``SENS_BAD_PARAM`` (2, checked first); nothing is
        written unless 0. None (nothing done) when the native loop cannot run this step or the compiled module
        predates the check: the caller then checks the weights itself and calls the plan."""
        self._check_counts(params, grads)
        mod = native_cpu.cpu_module.load()[0] if self._state_cpu else None
        if mod is None or not native_cpu.has_checked(mod) or not self._fill(params, grads, scores, beta1, beta2):
            return None
        return int(native_cpu.native_update(mod, self._table.data_ptr(), len(self.shapes), scores.data_ptr(),
                                            self.n_scores, float(beta1), float(beta2), native_cpu.NATIVE_THREADS,
                                            True, fn="sensitivity_update_checked"))


SENS_OK, SENS_BAD_GRAD, SENS_BAD_PARAM = 0, 1, 2   # codes of SensitivityPlan.update_checked (csrc: kSens*)


REGISTRY = {"torch": reference_backend(fused_sensitivity_update=reference.sensitivity_update_ref), "native": native_cpu,
            "triton": LazyBackend(".triton", __package__), "cuda": LazyBackend(".cuda", __package__)}


def _problem(params, grads, device) -> Problem:
    dtype = params[0].dtype if params else torch.float32
    dense = all(p.dtype is g.dtype and p.dtype is dtype and p.is_contiguous() and g.is_contiguous()
                for p, g in zip(params, grads))
    return Problem("sensitivity", device, dtype, dense=dense)


def _native_selected(dtype: torch.dtype) -> bool:
    """Whether the dispatcher would hand a dense CPU problem of this dtype to the native loop."""
    try:
        name, _ = select(Problem("sensitivity", torch.device("cpu"), dtype), REGISTRY)
    except Exception:
        return False
    return name == "native"


def fused_sensitivity_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    ipt: list[torch.Tensor],
    unc: list[torch.Tensor],
    kinds: list[int],
    score_offsets: list[int],
    scores: torch.Tensor,
    beta1: float = 0.85,
    beta2: float = 0.85,
) -> torch.Tensor:
    """One multi-tensor AdaLoRA sensitivity step for every adapter tensor, reduced per rank.

    Args:
        params: adapter tensors (fp32/fp16/bf16); kind 0 = λ [R], 1 = A [R, K], 2 = B [N, R].
        grads: their gradients, same shapes.
        ipt, unc: fp32 EMA state Ī, Ū, same shapes, contiguous; updated in place.
        kinds: 0/1/2 per tensor.
        score_offsets: where each tensor's module's ranks start in ``scores``.
        scores: fp32 [total_R]; ``s``, the row means of A's and the column means of B's ``s`` are
            ADDED to it (the caller zeroes it first).
        beta1, beta2: EMA factors in [0, 1).
    Returns:
        0-dim bool tensor: True when some gradient was non-finite; then nothing was modified.
    """
    check_sensitivity_args(params, grads, ipt, unc, kinds, score_offsets, scores, beta1, beta2)
    _, impl = select(_problem(params, grads, scores.device), REGISTRY)
    return impl.fused_sensitivity_update(list(params), list(grads), list(ipt), list(unc), list(kinds),
                                         list(score_offsets), scores, float(beta1), float(beta2))


def per_example_gate_grad(dg: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-token gate gradient reduced per example: ``out[b, i] = Σ_{t∈b} dG[t, i]`` (ALGORITHMS.md §3).

    Args:
        dg: [T, R] gradient of the per-token gate, tokens flattened row-major from [batch, S].
        batch: number of examples B; T must be a multiple of B.
    Returns:
        [B, R] fp32. Reference implementation (``dg.view(B, S, R).sum(1)``); fusing it into the gated op's
        backward is the kernels' job.
    """
    if not isinstance(dg, torch.Tensor) or dg.dim() != 2:
        raise ValueError(f"dg must be a [T, R] tensor, got shape {tuple(getattr(dg, 'shape', ()))}")
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral):
        raise TypeError(f"batch must be an int (the number of examples B), got {type(batch).__name__} {batch!r}")
    batch = int(batch)
    if batch < 0 or (batch == 0 and dg.shape[0]) or (batch and dg.shape[0] % batch):
        raise ValueError(f"batch={batch!r} must be a positive int dividing T={dg.shape[0]}")
    if batch == 0:
        return dg.new_zeros(0, dg.shape[1], dtype=torch.float32)
    return dg.float().view(batch, dg.shape[0] // batch, dg.shape[1]).sum(1)
