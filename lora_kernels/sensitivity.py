"""Batched AdaLoRA-style sensitivity update over every adapter tensor of a model (ALGORITHMS.md §2).

For every element w of every adapter tensor, with gradient g (β1 = β2 = 0.85 by default):
    I = |w·g|
    Ī ← β1·Ī + (1−β1)·I
    Ū ← β2·Ū + (1−β2)·|I − Ī|        # the UPDATED Ī, as PEFT's RankAllocator.update_ipt does
    s = Ī·Ū
and per rank i of the module the adapter belongs to (PEFT's ``mask_to_budget`` triplet score):
    S_i = s(λ_i) + mean_k s(A_ik) + mean_n s(B_ni)

Adapter kinds: 0 = λ (E) [R], 1 = A [R, K], 2 = B [N, R].

Backends (one signature, see :func:`fused_sensitivity_update`): ``torch`` (this file: on CPU the native
one-pass loop of the compiled CPU module, csrc/cpu/sensitivity_cpu.cpp, else the pure-torch reference),
``triton`` (:mod:`lora_kernels.triton_sensitivity`, a pointer-table multi-tensor kernel) and ``cuda``
(:mod:`lora_kernels.cuda_sensitivity`). A step whose gradients contain NaN/Inf leaves every state and
score untouched and returns True (as a 0-dim bool tensor, so GPU callers need no host sync).
``LORA_KERNELS_CPU_NATIVE=0`` makes the torch backend use the pure-torch reference on CPU too.
"""
from __future__ import annotations

import os

import torch

from . import _cpu_loader
from .checks import FLOAT_DTYPES
from .dispatch import Problem, requested_backend, select
from .gated import _Lazy

KIND_E, KIND_A, KIND_B = 0, 1, 2


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
        for name, t in (("ipt", a), ("unc", u)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.shape != p.shape:
                raise TypeError(f"{name}[{j}] must be float32 with shape {tuple(p.shape)}, got "
                                f"{getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}")
            if not t.is_contiguous() or t.device != scores.device:
                raise ValueError(f"{name}[{j}] must be contiguous and on {scores.device} (state is updated in place)")
        r = ranks_of(k, tuple(p.shape))
        if not isinstance(off, int) or off < 0 or off + r > scores.numel():
            raise ValueError(f"score_offsets[{j}]={off!r} with R={r} does not fit scores of length {scores.numel()}")


# ---- torch reference ---------------------------------------------------------------------------------
def _rank_index(kinds, shapes, offsets, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For the concatenation of all adapter tensors (row-major), each element's score slot and weight."""
    idx, w = [], []
    for k, shape, off in zip(kinds, shapes, offsets):
        if k == KIND_E:
            i = torch.arange(shape[0], device=device)
            wt = 1.0
        elif k == KIND_A:                                    # [R, K]: row i is rank i
            i = torch.arange(shape[0], device=device).repeat_interleave(shape[1])
            wt = 1.0 / shape[1]
        else:                                                # [N, R]: column i is rank i
            i = torch.arange(shape[1], device=device).repeat(shape[0])
            wt = 1.0 / shape[0]
        idx.append(i + off)
        w.append(torch.full((i.numel(),), wt, dtype=torch.float32, device=device))
    return torch.cat(idx), torch.cat(w)


_INDEX_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _cached_rank_index(kinds, shapes, offsets, device):
    key = (tuple(kinds), tuple(shapes), tuple(offsets), str(device))
    hit = _INDEX_CACHE.get(key)
    if hit is None:
        if len(_INDEX_CACHE) > 64:  # a model has one layout; bound the cache for callers that vary it
            _INDEX_CACHE.clear()
        hit = _INDEX_CACHE[key] = _rank_index(kinds, shapes, offsets, device)
    return hit


def _flat_view(ts: list[torch.Tensor]) -> torch.Tensor | None:
    """The one flat fp32 buffer ``ts`` are consecutive slices of (in order), or None."""
    base = ts[0]._base if ts[0]._base is not None else None
    if base is None or base.dim() != 1:
        return None
    pos = ts[0].data_ptr() - base.data_ptr()
    if pos != 0:
        return None
    esz = base.element_size()
    for t in ts:
        if t._base is not base or t.data_ptr() - base.data_ptr() != pos:
            return None
        pos += t.numel() * esz
    return base[: pos // esz]


def sensitivity_update_ref(params, grads, ipt, unc, kinds, score_offsets, scores, beta1, beta2) -> torch.Tensor:
    """Pure-torch reference of :func:`fused_sensitivity_update` (same arguments, same semantics).

    Multi-tensor, no per-parameter Python loop in the arithmetic: when ``ipt`` and ``unc`` are consecutive
    slices of one flat buffer each (as :class:`python_api.SensitivityTracker` allocates them), the update
    runs as a handful of ops on the flat buffers; otherwise as ``torch._foreach_*`` ops. Per-parameter
    loops cost ~3.4 ms per step on MiniLM-L6 (PERFORMANCE.md) in op launch overhead alone.
    """
    device = scores.device
    if not params:
        return torch.zeros((), dtype=torch.bool, device=device)
    gnorm = torch._foreach_norm(list(grads), float("inf"))
    bad = ~torch.isfinite(torch.stack(gnorm)).all()
    if device.type == "cpu" and bool(bad):  # on CPU the check costs no device sync
        return bad
    shapes = [tuple(p.shape) for p in params]
    flat_i, flat_u = _flat_view(list(ipt)), _flat_view(list(unc))
    if flat_i is not None and flat_u is not None:
        pf = torch.cat([p.reshape(-1) for p in params]).float()
        gf = torch.cat([g.reshape(-1) for g in grads]).float()
        cur = pf.mul_(gf).abs_()                                                  # I
        if device.type == "cpu":  # in place: every pass over the 0.5M-entry state is what costs on CPU
            new_i = flat_i.mul_(beta1).add_(cur, alpha=1.0 - beta1)               # Ī
            new_u = flat_u.mul_(beta2).add_(cur.sub_(new_i).abs_(), alpha=1.0 - beta2)  # Ū, with the updated Ī
            s = new_i * new_u
        else:  # no host sync: a skipped step writes the old state back
            new_i = flat_i * beta1 + cur * (1.0 - beta1)
            new_u = flat_u * beta2 + cur.sub_(new_i).abs_().mul_(1.0 - beta2)
            s = (new_i * new_u).masked_fill_(bad, 0.0)
            flat_i.copy_(torch.where(bad, flat_i, new_i))
            flat_u.copy_(torch.where(bad, flat_u, new_u))
        idx, w = _cached_rank_index(kinds, shapes, score_offsets, device)
        scores.index_add_(0, idx, s.mul_(w))
        return bad
    pf = [p.float() for p in params]
    gf = [g.float() for g in grads]
    cur = torch._foreach_mul(pf, gf)
    torch._foreach_abs_(cur)
    new_i = torch._foreach_add(torch._foreach_mul(list(ipt), beta1), cur, alpha=1.0 - beta1)
    torch._foreach_sub_(cur, new_i)
    torch._foreach_abs_(cur)
    new_u = torch._foreach_add(torch._foreach_mul(list(unc), beta2), cur, alpha=1.0 - beta2)
    s = torch.cat([t.reshape(-1) for t in torch._foreach_mul(new_i, new_u)])
    if device.type != "cpu":  # no host sync: a skipped step writes the old state back
        s = s.masked_fill_(bad, 0.0)
        new_i = [torch.where(bad, a, b) for a, b in zip(ipt, new_i)]
        new_u = [torch.where(bad, a, b) for a, b in zip(unc, new_u)]
    torch._foreach_copy_(list(ipt), new_i)
    torch._foreach_copy_(list(unc), new_u)
    idx, w = _cached_rank_index(kinds, shapes, score_offsets, device)
    scores.index_add_(0, idx, s.mul_(w))
    return bad


# ---- native CPU loop ---------------------------------------------------------------------------------
NATIVE_ENV = "LORA_KERNELS_CPU_NATIVE"
NATIVE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # = module DTYPE_F32/F16/BF16
# One thread by default: the loop is memory-bound (~11 GB/s on one core), and on the shared 2-core box two
# OpenMP threads measured 28x SLOWER than one (30.8 vs 1.09 ms for MiniLM-L6's 0.5M entries at load ~8).
NATIVE_THREADS = 1


def native_available() -> tuple[bool, str]:
    """Whether the CPU module's fused loop can be used at all (module loads, not disabled by the env var)."""
    if os.environ.get(NATIVE_ENV, "1").strip() == "0":
        return False, f"{NATIVE_ENV}=0 forces the pure-torch reference"
    mod, err = _cpu_loader.load()
    if mod is None:
        return False, f"compiled CPU module not loadable ({err})"
    return True, "native one-pass CPU loop (lora_kernels._lora_kernels_cpu)"


def _flush_denormal_on() -> bool:
    # torch has a setter and no getter: with FTZ/DAZ on, a subnormal input reads as zero.
    return bool(torch.tensor(1e-40, dtype=torch.float32).mul(2.0).item() == 0.0)


FLUSH_ENV = "LORA_KERNELS_FLUSH_DENORMAL"   # "0": the native loop keeps subnormals (exact below 1.2e-38)


def _native_update(mod, *args) -> bool:
    """The native loop with flush-to-zero on (the caller's setting restored after). Gradients that repeat push
    Ū = β2·Ū + (1−β2)·|I − Ī| geometrically into fp32 subnormals, and subnormal arithmetic is microcoded on x86:
    measured on the 2-core EPYC, MiniLM's 72 A/B tensors with Ū at 1e-39: 0.66 → 0.39 ms per update (1.7×).
    Values below 1.2e-38 become 0 (scores of that size are 0 for ranking). NATIVE_THREADS = 1: the loop runs on
    this thread, the one whose MXCSR ``set_flush_denormal`` sets. ``LORA_KERNELS_FLUSH_DENORMAL=0`` turns it off
    (then bf16 weights below 1.2e-38, themselves subnormal, are decoded and used exactly)."""
    if os.environ.get(FLUSH_ENV, "1").strip() == "0":
        return mod.sensitivity_update(*args)
    was_on = _flush_denormal_on()
    if not was_on:
        torch.set_flush_denormal(True)
    try:
        return mod.sensitivity_update(*args)
    finally:
        if not was_on:
            torch.set_flush_denormal(False)


def _native_ok(p: torch.Tensor, g: torch.Tensor) -> bool:
    return (p.is_cpu and g.is_cpu and p.dtype is g.dtype and p.dtype in NATIVE_DTYPES and p.is_contiguous()
            and g.is_contiguous())


def _row_len(kind: int, p: torch.Tensor) -> int:
    return 1 if kind == KIND_E else p.shape[-1]


# Columns the native loop's rows carry per call (csrc/sensitivity_table.h, SensCol); the others are static.
_COL_PARAM, _COL_GRAD, _COL_DTYPE, _NATIVE_COLS = 0, 1, 6, 9


def _native_table(ipt, unc, kinds, score_offsets) -> torch.Tensor:
    """[n, 9] int64 rows for the native loop with the static columns filled (state pointers, numel, kind, row
    length, score offset); the w / g pointers and their dtype code are written per call (:func:`_fill_native`)."""
    return torch.tensor([(0, 0, a.data_ptr(), u.data_ptr(), a.numel(), k, 0, _row_len(k, a), off)
                         for a, u, k, off in zip(ipt, unc, kinds, score_offsets)],
                        dtype=torch.int64).reshape(len(kinds), _NATIVE_COLS)


def _fill_native(rows, param_ptrs, grad_ptrs, codes) -> None:
    rows[:, _COL_PARAM], rows[:, _COL_GRAD], rows[:, _COL_DTYPE] = param_ptrs, grad_ptrs, codes


def sensitivity_update_native(params, grads, ipt, unc, kinds, score_offsets, scores, beta1, beta2,
                              n_threads: int = NATIVE_THREADS) -> torch.Tensor:
    """The fused one-pass CPU loop (same arguments and semantics as :func:`fused_sensitivity_update`).

    Needs contiguous CPU ``params``/``grads`` of one dtype per pair (fp32, fp16 or bf16); the caller has
    validated shapes (:func:`check_sensitivity_args`). Scores do not depend on ``n_threads`` (per-tensor
    double partial sums are added in tensor order).
    """
    mod = _cpu_loader.require()
    for j, (p, g) in enumerate(zip(params, grads)):
        if not _native_ok(p, g):
            raise ValueError(f"params[{j}]/grads[{j}] ({p.dtype}/{g.dtype} on {p.device}/{g.device}, contiguous "
                             f"{p.is_contiguous()}/{g.is_contiguous()}): the native CPU loop needs contiguous CPU "
                             f"tensors of one dtype in fp32/fp16/bf16")
    if not params:
        return torch.zeros((), dtype=torch.bool)
    table = _native_table(ipt, unc, kinds, score_offsets)  # must outlive the call
    _fill_native(table.numpy(), [p.data_ptr() for p in params], [g.data_ptr() for g in grads],
                 [NATIVE_DTYPES[p.dtype] for p in params])
    bad = _native_update(mod, table.data_ptr(), len(params), scores.data_ptr(), scores.numel(), float(beta1),
                         float(beta2), int(n_threads))
    return torch.tensor(bad)


def _torch_backend_update(params, grads, ipt, unc, kinds, score_offsets, scores, beta1, beta2) -> torch.Tensor:
    if scores.is_cpu and native_available()[0] and all(_native_ok(p, g) for p, g in zip(params, grads)):
        return sensitivity_update_native(params, grads, ipt, unc, kinds, score_offsets, scores, beta1, beta2)
    return sensitivity_update_ref(params, grads, ipt, unc, kinds, score_offsets, scores, beta1, beta2)


class _TorchBackend:
    @staticmethod
    def supports(p: Problem) -> tuple[bool, str]:
        if p.device.type != "cpu":
            return True, "pure-torch reference"
        ok, why = native_available()
        if ok:
            return True, (f"{why} for contiguous fp32/fp16/bf16 tensors; the pure-torch reference for any other "
                          f"input")
        return True, f"pure-torch reference ({why})"

    fused_sensitivity_update = staticmethod(_torch_backend_update)


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
        self._table = _native_table(self.ipt, self.unc, self.kinds, self.offsets)
        self._np = self._table.numpy()

    def __call__(self, params, grads, scores: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
        """Same as :func:`fused_sensitivity_update` over this plan's state; returns the 0-dim bool flag."""
        n = len(self.shapes)
        if len(params) != n or len(grads) != n:
            raise ValueError(f"the plan covers {n} tensors, got {len(params)} params and {len(grads)} grads")
        if (n and self._state_cpu and scores.is_cpu and scores.numel() == self.n_scores
                and scores.dtype is torch.float32 and scores.is_contiguous() and 0.0 <= beta1 < 1.0
                and 0.0 <= beta2 < 1.0 and requested_backend() in ("auto", "torch") and native_available()[0]):
            pp, gp, codes = [], [], []
            for p, g, shape in zip(params, grads, self.shapes):
                code = NATIVE_DTYPES.get(p.dtype)
                if (code is None or g.dtype is not p.dtype or p.shape != shape or g.shape != shape or not p.is_cpu
                        or not g.is_cpu or not p.is_contiguous() or not g.is_contiguous()):
                    break
                pp.append(p.data_ptr())
                gp.append(g.data_ptr())
                codes.append(code)
            else:
                _fill_native(self._np, pp, gp, codes)
                mod = _cpu_loader.require()
                return torch.tensor(_native_update(mod, self._table.data_ptr(), n, scores.data_ptr(), self.n_scores,
                                                   float(beta1), float(beta2), NATIVE_THREADS))
        flat = [(p.reshape(-1), g.reshape(-1)) if k == KIND_E else (p, g) for p, g, k in zip(params, grads, self.kinds)]
        return fused_sensitivity_update([p for p, _ in flat], [g for _, g in flat], self.ipt, self.unc, self.kinds,
                                        self.offsets, scores, beta1, beta2)


REGISTRY = {
    "torch": _TorchBackend(),
    "triton": _Lazy(".triton_sensitivity"),
    "cuda": _Lazy(".cuda_sensitivity"),
}


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
    dtype = params[0].dtype if params else torch.float32
    _, impl = select(Problem("sensitivity", scores.device, dtype), REGISTRY)
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
    if not isinstance(batch, int) or batch < 0 or (batch == 0 and dg.shape[0]) or (batch and dg.shape[0] % batch):
        raise ValueError(f"batch={batch!r} must be a positive int dividing T={dg.shape[0]}")
    if batch == 0:
        return dg.new_zeros(0, dg.shape[1], dtype=torch.float32)
    return dg.float().view(batch, dg.shape[0] // batch, dg.shape[1]).sum(1)
