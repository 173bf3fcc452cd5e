"""ShapLoRA: Shapley sensitivity of rank triplets, global top-B allocation, retrain from scratch (ALGORITHMS.md §3).

The paper's estimator is not public; the ``taylor`` estimator here is OURS [ours]:
- players: every active rank (triplet) of every :class:`LoRALinear` of the model;
- game: ``v(S) = −L_val`` with only the ranks in S on;
- each validation example b gets its own coalition, drawn with exact Shapley weights (``q ~ U(0,1)``, each
  rank kept with probability q), applied as a per-token gate m [T, R] (a leaf that requires grad);
- one backward pass of the summed per-example loss gives, for every example and rank,
  ``c_{b,i} = −Σ_{t∈b} ∂L_b/∂m[t,i] = −λ_i Σ_{t∈b} ∂L_b/∂G[t,i]`` (G = λ⊙m is the gate the op sees, so
  λ enters through the chain rule and is not multiplied in again): the first-order gain of switching
  rank i on against a Shapley-weighted coalition of the others;
- ``φ_i = mean_b c_{b,i}`` (signed Monte-Carlo Shapley estimate); its standard error is returned too.
With q ≡ 1 and one batch, ``B·|φ_i| = |λ_i ∂L/∂λ_i|`` for the summed loss L (AdaLoRA's sensitivity of λ_i).
``permutation`` (Monte-Carlo with true loss evaluations) and ``exact`` (all 2^N coalitions, N ≤ 12) are
the references the estimator is tested against.
The workflow scores the super-network in the SVD basis of each module's merged update (:func:`to_merged_basis`):
trained with a plain loss, SVD-form components come out near-parallel and share one direction's credit, which
misallocates at a tight budget (bench/bench_planted.py measures it against planted ranks).
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lora_kernels import __version__
from lora_kernels.sensitivity import per_example_gate_grad

from ..config import check_finite, is_binary
from ..layers import LoRALinear
from ..surgery import adapter_layers

LossFn = Callable[[nn.Module, Any], torch.Tensor]   # (model, batch) -> per-example losses [B]
MAX_EXACT_PLAYERS = 12


def _layers(model: nn.Module) -> dict[str, LoRALinear]:
    out = adapter_layers(model)
    if not out:
        raise ValueError(f"model ({type(model).__name__}) contains no LoRALinear layer")
    return out


def _batch_size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, torch.Tensor) and item.dim() > 0:
                return item.shape[0]
    raise TypeError(f"cannot infer the batch size of a {type(batch).__name__}; pass batch_size_fn")


# ---- Shapley values of an abstract game (the references) ------------------------------------------------
def exact_shapley(value: Callable[[torch.Tensor], float], n: int) -> torch.Tensor:
    """Exact Shapley values by enumerating all 2^n coalitions. ``value(mask [n] bool) -> float``. Returns [n]."""
    if not 1 <= n <= MAX_EXACT_PLAYERS:
        raise ValueError(f"exact Shapley enumerates 2^n coalitions: n must be in [1, {MAX_EXACT_PLAYERS}], got {n}")
    codes = torch.arange(2 ** n)
    bits = (codes.unsqueeze(1) >> torch.arange(n)) & 1                             # [2^n, n]
    v = torch.tensor([value(b.bool()) for b in bits], dtype=torch.float64)       # [2^n]
    size = bits.sum(1)
    w = torch.tensor([math.factorial(k) * math.factorial(n - 1 - k) / math.factorial(n) if k < n else 0.0
                      for k in range(n + 1)], dtype=torch.float64)
    phi = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        without = codes[bits[:, i] == 0]
        phi[i] = (w[size[without]] * (v[without | (1 << i)] - v[without])).sum()
    return phi


def permutation_shapley(value: Callable[[torch.Tensor], float], n: int, num_permutations: int,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo Shapley values over random orderings (true value evaluations, n+1 per ordering).
    Returns ``(φ [n], standard error [n])``."""
    if isinstance(num_permutations, bool) or not isinstance(num_permutations, numbers.Integral) \
            or num_permutations < 1:
        raise ValueError(f"num_permutations must be an int >= 1, got {num_permutations!r}")
    marg = torch.zeros(num_permutations, n, dtype=torch.float64)
    for p in range(num_permutations):
        mask = torch.zeros(n, dtype=torch.bool)
        prev = value(mask)
        for i in torch.randperm(n, generator=generator).tolist():
            mask[i] = True
            cur = value(mask)
            marg[p, i] = cur - prev
            prev = cur
    se = marg.std(0) / math.sqrt(num_permutations) if num_permutations > 1 else torch.full((n,), float("inf"))
    return marg.mean(0), se


# ---- the model game -----------------------------------------------------------------------------------
class _Players:
    """Active ranks of every LoRALinear, in module order: player j ↔ (module name, rank index)."""

    def __init__(self, model: nn.Module):
        self.layers = _layers(model)
        merged = [n for n, m in self.layers.items() if m.merged]
        if merged:   # its weight holds the update: no rank can be switched off (and no mask set)
            raise ValueError(f"Shapley scoring needs unmerged adapters; merged: {merged[:4]} (unmerge() first)")
        self.saved = {n: m.rank_mask.clone() for n, m in self.layers.items()}
        self.index = [(n, i) for n, m in self.layers.items() for i in m.rank_mask.nonzero().flatten().tolist()]
        if not self.index:
            raise ValueError("every rank of every LoRALinear is masked: no players")
        self.gates = {n: m._token_gate for n, m in self.layers.items()}   # the user's, put back by restore()
        for m in self.layers.values():
            m.set_token_gate(None)   # scoring sees the rank masks alone

    def split(self, flat: torch.Tensor, fill: float = float("nan")) -> dict[str, torch.Tensor]:
        """Player vector [..., N] → module name → [..., R] (non-players get ``fill``)."""
        out = {n: flat.new_full((*flat.shape[:-1], m.r), fill) for n, m in self.layers.items()}
        for j, (n, i) in enumerate(self.index):
            out[n][..., i] = flat[..., j]
        return out

    def restore(self):
        for n, m in self.layers.items():
            m.set_rank_mask(self.saved[n])
            m.set_token_gate(self.gates[n])


class _NoExamples(ValueError):
    """No usable validation example in the batches given (none at all, or every loss non-finite); a split-scoring
    half names itself on top."""


def _val_loss(model, batches, loss_fn, skipped: dict | None = None) -> float:
    # Non-finite per-example losses are left out of the mean (and counted): one poisoned example must not
    # turn every Shapley value into NaN.
    tot, cnt, seen = 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            losses = loss_fn(model, batch).detach().double().reshape(-1)
            ok = torch.isfinite(losses)
            tot += float(losses[ok].sum())
            cnt += int(ok.sum())
            seen += losses.numel()
    if seen == 0:
        raise _NoExamples("batches is empty: no validation examples")
    if cnt == 0:
        raise _NoExamples(f"every validation loss is non-finite (NaN/Inf) ({seen} of {seen} examples)")
    if skipped is not None:
        skipped.update(n=max(skipped.get("n", 0), seen - cnt), of=seen)
    return tot / cnt


def _value_fn(players: _Players, model, batches, loss_fn, skipped: dict | None = None):
    cache: dict[bytes, float] = {}

    def value(mask: torch.Tensor) -> float:
        key = mask.numpy().tobytes()
        if key not in cache:
            on = players.split(mask.double(), fill=0.0)
            for n, m in players.layers.items():
                m.set_rank_mask(on[n].bool() & players.saved[n])
            cache[key] = -_val_loss(model, batches, loss_fn, skipped)
        return cache[key]
    return value


def _taylor(players: _Players, model, batches, loss_fn, num_passes, q, generator, batch_size_fn,
            skipped: dict | None = None):
    n = len(players.index)
    total = torch.zeros(n, dtype=torch.float64)
    total_sq = torch.zeros(n, dtype=torch.float64)
    count, seen = 0, 0
    state: dict[str, Any] = {}

    def hook(name):
        def pre(mod, args):
            x = args[0]
            t, b = x.numel() // mod.in_features, state["B"]
            if t % b:
                raise ValueError(f"{name}: {t} tokens is not a multiple of the batch size {b}; the coalition of "
                                 "an example must cover its tokens")
            leaf = state["coal"][name].repeat_interleave(t // b, 0).to(x.device).requires_grad_(True)  # [T, R]
            state["leaves"].append((name, leaf))
            mod.set_token_gate(leaf)
        return pre

    handles = [m.register_forward_pre_hook(hook(nm)) for nm, m in players.layers.items()]
    # Only the gates' gradients are read: with A, B, λ frozen for the pass, the op's backward skips dA and dB (two
    # of its five products, each a pass over x or dy). Restored in the finally below, errors included.
    frozen = [(p, p.requires_grad) for m in players.layers.values()
              for p in (m.lora_A, m.lora_B, m.lora_E) if p is not None]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        for _ in range(num_passes):
            for batch in batches:
                b = batch_size_fn(batch)
                if b == 0:
                    continue
                qb = torch.full((b, 1), float(q)) if q is not None else torch.rand(b, 1, generator=generator)
                coal = (torch.rand(b, n, generator=generator) < qb).float()                # [B, N]
                state.update(B=b, coal=players.split(coal, fill=0.0), leaves=[])
                losses = loss_fn(model, batch)
                if losses.shape != (b,):
                    raise ValueError(f"loss_fn must return per-example losses [B] = [{b}], got {tuple(losses.shape)}")
                leaves = state["leaves"]
                if not leaves:
                    raise RuntimeError("no LoRALinear ran in loss_fn's forward")
                grads = torch.autograd.grad(losses.sum(), [lf for _, lf in leaves], allow_unused=True)
                per_mod: dict[str, torch.Tensor] = {}
                for (name, _leaf), g in zip(leaves, grads):
                    if g is not None:
                        c = -per_example_gate_grad(g, b).double()                          # [B, R]
                        per_mod[name] = per_mod[name] + c if name in per_mod else c
                c = torch.stack([per_mod[nm][:, i] if nm in per_mod else torch.zeros(b, dtype=torch.float64)
                                 for nm, i in players.index], 1)                             # [B, N]
                # An example with a non-finite loss or gate gradient is skipped (counted, warned about):
                # its NaN would otherwise reach every player's mean.
                ok = torch.isfinite(losses.detach()).reshape(-1).cpu() & torch.isfinite(c).all(1)
                c = c[ok]
                total += c.sum(0)
                total_sq += (c * c).sum(0)
                count += int(ok.sum())
                seen += b
    finally:
        for h in handles:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    if seen == 0:
        raise _NoExamples("batches is empty: no validation examples")
    if count == 0:
        raise _NoExamples(f"every validation example has a non-finite (NaN/Inf) loss or gate gradient "
                          f"({seen} of {seen})")
    if skipped is not None:
        skipped.update(n=seen - count, of=seen)
    phi = total / count
    var = (total_sq / count - phi * phi).clamp_min(0) * count / max(count - 1, 1)
    return phi, (var / count).sqrt()


def shapley_sensitivity(
    model: nn.Module,
    batches: Iterable,
    mode: str = "taylor",
    *,
    loss_fn: LossFn,
    num_passes: int = 1,
    q: float | None = None,
    num_permutations: int = 16,
    generator: torch.Generator | None = None,
    batch_size_fn: Callable[[Any], int] | None = None,
    return_stats: bool = False,
):
    """Shapley sensitivity of every rank triplet of every :class:`LoRALinear` in ``model``.

    Args:
        model: the super-network (SVD-form adapters, ``svd=True``, are the intended use).
        batches: validation batches (a re-iterable, e.g. a list or a DataLoader) — not the training split.
        mode: ``"taylor"`` (ours: batched first-order estimator, ``num_passes`` backward passes over
            ``batches``), ``"permutation"`` (``num_permutations`` orderings, N+1 validation evaluations each)
            or ``"exact"`` (2^N validation evaluations, N ≤ 12 players).
        loss_fn: ``(model, batch) -> per-example losses [B]``.
        q: fixed keep-probability (taylor); None draws ``q ~ U(0,1)`` per example (Shapley weights).
        generator: RNG for coalitions / orderings (save its state to resume reproducibly).
        batch_size_fn: ``batch -> B`` when the first tensor of the batch does not lead with B.
    Returns:
        dict module name → φ [R] (float64; NaN at ranks masked before the call, which are not players);
        with ``return_stats`` also dict module name → standard error [R] (taylor, permutation; zeros for exact).
    The model's train/eval mode, rank masks and token gates are restored afterwards; scoring runs in eval mode.
    Validation examples with a non-finite loss (or, taylor, gate gradient) are skipped with a RuntimeWarning
    giving their number (permutation/exact: the most skipped by one coalition); if every example is non-finite,
    or the scores overflow, a ValueError. Player scores are never NaN.
    """
    scores, se, _ = _shapley(model, batches, mode, loss_fn, num_passes, q, num_permutations, generator,
                             batch_size_fn)
    return (scores, se) if return_stats else scores


def _shapley(model, batches, mode, loss_fn, num_passes, q, num_permutations, generator, batch_size_fn):
    """:func:`shapley_sensitivity`'s work: (φ per module, standard errors per module, the examples the scores
    rest on: non-finite ones left out, each pass counted)."""
    _check_scoring_args(mode, num_passes, loss_fn)
    if q is not None and not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1] or None, got {q}")
    batches = list(batches) if not isinstance(batches, (list, tuple)) else batches
    players = _Players(model)
    was_training = model.training
    model.eval()
    skipped: dict[str, int] = {}
    try:
        if mode == "taylor":
            phi, se = _taylor(players, model, batches, loss_fn, num_passes, q, generator, batch_size_fn or _batch_size,
                              skipped)
        else:
            value = _value_fn(players, model, batches, loss_fn, skipped)
            if mode == "exact":
                phi, se = exact_shapley(value, len(players.index)), None
            else:
                phi, se = permutation_shapley(value, len(players.index), num_permutations, generator)
    finally:
        try:
            players.restore()
        finally:
            model.train(was_training)
    if skipped.get("n"):
        warnings.warn(f"shapley_sensitivity: skipped {skipped['n']} of {skipped['of']} validation examples with a "
                      "non-finite (NaN/Inf) loss or gate gradient", RuntimeWarning, stacklevel=3)
    if not bool(torch.isfinite(phi).all()):
        raise ValueError("shapley_sensitivity: the scores overflow float64 (the losses or their gradients are too "
                         "large); rescale loss_fn")
    return (players.split(phi), players.split(se if se is not None else torch.zeros_like(phi)),
            skipped["of"] - skipped.get("n", 0))


# ---- allocation and export ----------------------------------------------------------------------------
def check_budget(budget, low: int, high: int, what: str = "", name: str = "budget") -> int:
    """``budget`` as a Python int, after checking it is an integer (numpy integers too; not bool, not float —
    a fraction of a rank would otherwise be truncated silently) in ``[low, high]``."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise TypeError(f"{name} must be an integer (a total number of ranks), got {type(budget).__name__} "
                        f"{budget!r}")
    budget = int(budget)
    if not low <= budget <= high:
        raise ValueError(f"{name} must be in [{low}, {high}]{f' ({what})' if what else ''}, got {budget}")
    return budget


BUDGET_UNITS = ("ranks", "params")
RETRAIN_FORMS = ("plain", "svd", "warm")   # warm: plain LoRA started from the super-network's kept components


def select_within_budget(key: torch.Tensor, budget: int, costs: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the items kept: the highest ``key`` first (ties toward the earlier item; ``-inf`` never kept).
    Without ``costs``: the top ``budget`` items. With ``costs`` (a positive integer cost per item, e.g. the
    parameters one rank adds): greedily in key order, every item whose cost still fits in what is left of
    ``budget`` (an item that does not fit is skipped and cheaper ones after it may still fit), so the total cost
    is at most ``budget`` and short of it by less than the cost of the cheapest item left out. A NaN key is not a
    candidate either (as ``-inf``)."""
    key = torch.as_tensor(key)
    if key.dim() != 1 or not key.is_floating_point():
        raise ValueError(f"key must be a 1-D float tensor, got shape {tuple(key.shape)} dtype {key.dtype}")
    budget = check_budget(budget, 0, 2 ** 62)   # a rank budget above the items keeps every candidate
    key = key.masked_fill(torch.isnan(key), -math.inf)   # (nan_to_num would also turn -inf into a finite value)
    order = torch.sort(key, descending=True, stable=True).indices
    order = order[key[order] != -math.inf]   # -inf: not a candidate
    keep = torch.zeros(key.numel(), dtype=torch.bool)
    if costs is None:
        keep[order[:budget]] = True
        return keep
    left = int(budget)
    for i, c in zip(order.tolist(), costs[order].tolist()):
        if c <= left:
            keep[i] = True
            left -= int(c)
            if left == 0:
                break
    return keep


def rank_costs(model: nn.Module, form: str = "plain") -> dict[str, int]:
    """Trainable parameters one rank adds to each LoRALinear of ``model`` once retrained in ``form``:
    ``in + out`` for plain LoRA (a row of A, a column of B; ``"warm"`` is plain LoRA too), one more (its λ) in
    SVD form."""
    if form not in RETRAIN_FORMS:
        raise ValueError(f"form must be one of {RETRAIN_FORMS}, got {form!r}")
    return {n: m.in_features + m.out_features + (form == "svd") for n, m in _layers(model).items()}


def allocate_ranks(scores: dict[str, torch.Tensor], budget: int, *, by: str = "signed",
                   costs: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Keep the global top-``budget`` rank triplets, or the best ones within a parameter budget.

    Args:
        scores: module name → [R] scores (NaN = not a candidate, e.g. already pruned).
        budget: without ``costs``: total ranks kept over all modules, any integer (Python or numpy) in
            [0, #scored ranks]. With ``costs``: total trainable parameters the kept ranks may add, any integer
            from 0 to the cost of every scored rank; ranks are taken best first while they fit
            (:func:`select_within_budget`), so the total is within one rank's cost of the budget.
        by: ``"signed"`` ranks by φ (a rank that raises the loss ranks last), ``"abs"`` by |φ| (AdaLoRA-like).
        costs: module name → parameters per rank of that module (:func:`rank_costs`); None = a rank budget.
    Returns:
        module name → bool mask [R]. Ties break toward the earlier (module, rank).
    """
    _check_by(by)
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a dict of module name -> [R] scores, got {type(scores).__name__}")
    if not scores:
        raise ValueError("scores is empty")
    names = list(scores)
    not_1d = {n: tuple(torch.as_tensor(scores[n]).shape) for n in names if torch.as_tensor(scores[n]).dim() != 1}
    if not_1d:
        raise ValueError(f"scores must be 1-D [R] per module, got shapes {not_1d}")
    flat = torch.cat([torch.as_tensor(scores[n]).detach().double().cpu().reshape(-1) for n in names])
    inf = [n for n in names if bool(torch.isinf(torch.as_tensor(scores[n]).detach().double()).any())]
    if inf:  # ±inf would tie with the NaN (not a candidate) key below
        raise ValueError(f"scores of modules {inf} contain ±Inf; scores must be finite (NaN = not a candidate)")
    valid = ~torch.isnan(flat)
    cost = None
    if costs is None:
        budget = check_budget(budget, 0, int(valid.sum()), "the number of scored ranks")
    else:
        missing = [n for n in names if n not in costs]
        if missing:
            raise KeyError(f"costs has no entry for modules {missing}")
        bad = {n: costs[n] for n in names if isinstance(costs[n], bool) or not isinstance(costs[n], numbers.Integral)
               or costs[n] < 1}
        if bad:
            raise ValueError(f"costs must be positive integers (parameters per rank), got {bad}")
        cost = torch.cat([torch.full((torch.as_tensor(scores[n]).numel(),), int(costs[n]), dtype=torch.long)
                          for n in names])
        budget = check_budget(budget, 0, int(cost[valid].sum()), "the parameters of every scored rank")
    key = flat.abs() if by == "abs" else flat.clone()
    key[~valid] = -math.inf
    keep = select_within_budget(key, budget, cost)
    out, off = {}, 0
    for n in names:
        r = torch.as_tensor(scores[n]).numel()
        out[n] = keep[off: off + r].clone()
        off += r
    return out


def _mask_dict(masks) -> dict[str, torch.Tensor]:
    """``masks`` as module name → 1-D bool tensor, or an error naming the module: 0/1 values only (a mask of 2s
    would count as 2 kept ranks in one export and 1 in the other)."""
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict of module name -> bool mask [R], got {type(masks).__name__}")
    out = {}
    for n, m in masks.items():
        try:
            t = torch.as_tensor(m)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"masks[{n!r}]: not a bool mask: {e}") from None
        if t.dim() != 1:
            raise ValueError(f"masks[{n!r}]: must be 1-D [R], got shape {tuple(t.shape)}")
        if not is_binary(t):
            raise ValueError(f"masks[{n!r}]: must be boolean or 0/1 valued, got {t.tolist()}")
        out[n] = t.bool()
    return out


def to_peft_rank_pattern(masks: dict[str, torch.Tensor]) -> dict[str, int]:
    """module name → kept rank, for PEFT's ``LoraConfig(rank_pattern=...)`` (modules with rank 0 left out:
    PEFT cannot build a rank-0 LoRA; drop them from ``target_modules`` too, see :func:`to_peft_lora_config`)."""
    return {n: int(m.sum()) for n, m in _mask_dict(masks).items() if int(m.sum()) > 0}


def to_peft_lora_config(masks: dict[str, torch.Tensor], lora_alpha: float, **kwargs):
    """A PEFT ``LoraConfig`` with the allocated per-module ranks (``r`` = the largest, ``rank_pattern`` the rest).
    Module names that are suffixes of one another (``fc``, ``z.fc``) are anchored (``peft_interop.peft_names``)."""
    from peft import LoraConfig

    from ..peft_interop import peft_names

    pattern = to_peft_rank_pattern(masks)
    if not pattern:
        raise ValueError("every module was allocated rank 0")
    targets, key = peft_names(pattern)
    return LoraConfig(r=max(pattern.values()), lora_alpha=lora_alpha, target_modules=targets,
                      rank_pattern={key(n): k for n, k in pattern.items()}, **kwargs)


def rank_pattern_config(masks: dict[str, torch.Tensor]) -> dict:
    """This package's JSON-able allocation: module → {"r_init", "kept" (rank indices)}."""
    return {"format": "lora_kernels.rank_pattern", "version": __version__,
            "modules": {n: {"r_init": int(m.numel()), "kept": m.nonzero().flatten().tolist()}
                        for n, m in _mask_dict(masks).items()}}


def masks_from_config(cfg: dict | str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`rank_pattern_config` (accepts the dict or its JSON text)."""
    if isinstance(cfg, str):
        try:
            cfg = json.loads(cfg)
        except json.JSONDecodeError as e:
            raise ValueError(f"rank pattern: not JSON text: {e}") from None
    if not isinstance(cfg, Mapping):
        raise TypeError(f"rank pattern must be a dict (or its JSON text) from rank_pattern_config, got "
                        f"{type(cfg).__name__}")
    if cfg.get("format") != "lora_kernels.rank_pattern":
        raise ValueError(f"not a lora_kernels rank pattern (format={cfg.get('format')!r})")
    modules = cfg.get("modules")
    if not isinstance(modules, Mapping):
        raise ValueError(f"rank pattern: 'modules' must be a dict of module name -> {{'r_init', 'kept'}}, got "
                         f"{type(modules).__name__}")
    out = {}
    for n, spec in modules.items():
        if not isinstance(spec, Mapping):
            raise ValueError(f"rank pattern, module {n!r}: expected {{'r_init': R, 'kept': [...]}}, got {spec!r}")
        r, kept = spec.get("r_init"), spec.get("kept")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"rank pattern, module {n!r}: r_init must be an int >= 1, got {r!r}")
        if not isinstance(kept, list) or any(isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < r
                                             for k in kept) or len(set(kept)) != len(kept):
            raise ValueError(f"rank pattern, module {n!r}: kept must list distinct rank indices in 0..{r - 1}, "
                             f"got {kept!r}")
        m = torch.zeros(r, dtype=torch.bool)
        m[kept] = True
        out[n] = m
    return out


def _checked_masks(layers: dict, masks: dict) -> dict[str, torch.Tensor]:
    """Every mask as a bool tensor of its layer's rank, or a ValueError naming the module: checked whole before
    any layer is changed."""
    if isinstance(masks, Mapping):
        unknown = sorted(set(masks) - set(layers))
        if unknown:
            raise KeyError(f"masks name modules that are not LoRALinear layers of the model: {unknown}")
    out = _mask_dict(masks)
    for n, t in out.items():
        if t.shape[0] != layers[n].r:
            raise ValueError(f"masks[{n!r}]: length must equal the layer's rank r={layers[n].r}, got shape "
                             f"{tuple(t.shape)}")
    return out


def apply_rank_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Sets each named LoRALinear's rank mask (the layer then computes on its active ranks only). All masks are
    checked before any is set."""
    layers = _layers(model)
    masks = _checked_masks(layers, masks)
    merged = [n for n in masks if layers[n].merged]
    if merged:
        raise ValueError(f"unmerge() before changing the rank masks of merged layers {merged[:4]}")
    for n, m in masks.items():
        layers[n].set_rank_mask(m)


def to_plain_lora(model: nn.Module, masks: dict[str, torch.Tensor], warm: bool = False) -> nn.Module:
    """Turns a model with SVD-form adapters into plain LoRA with the allocated rank pattern, in place: module
    ``n`` gets a new rank-``k_n`` LoRALinear (``k_n`` = kept ranks) at the SVD layer's scale (``alpha_n = scale ·
    k_n``, so ``alpha/r`` is unchanged), over the same frozen base weight; a module with no kept rank is given
    back its plain ``nn.Linear``. Dropout and the task heads kept trainable stay as they were; ``masks`` must name
    every adapter layer. What a PEFT user would train: LoRA with ``rank_pattern`` / ``alpha_pattern``
    (:func:`to_peft_lora_config`). All or nothing on error.

    ``warm=False``: fresh LoRA init (A Kaiming, B = 0): a retrain from scratch. ``warm=True``: the new adapters
    start at the kept components' update ``B[:, kept]·diag(λ[kept])·A[kept]``, factored by SVD into balanced
    factors ``A = √S·Vᵀ``, ``B = U·√S``; the layer's output equals the masked super-network's (up to rounding).
    """
    from ..surgery import CONFIG_ATTR, apply_adapters, exact_targets, replace_modules
    layers = _layers(model)
    masks = _checked_masks(layers, masks)
    left = [n for n in layers if n not in masks]
    if left:   # the plain adapters are applied in one call, which the remaining adapter layers would contradict
        raise ValueError(f"to_plain_lora needs a mask for every adapter layer; none for {left[:4]}"
                         f"{' ...' if len(left) > 4 else ''}")
    from ..share import SharedLoRALinear
    merged = [n for n in masks if layers[n].merged]
    if merged:   # the base weight holds the update: unwrapping would keep it in a "plain" nn.Linear
        raise ValueError(f"to_plain_lora needs unmerged adapters; merged: {merged[:4]} (unmerge() first)")
    shared = [n for n in masks if isinstance(layers[n], SharedLoRALinear)]
    if shared:
        raise ValueError(f"to_plain_lora needs unshared adapters; shared: {shared[:4]}")
    record = dict(getattr(model, CONFIG_ATTR, None) or {})
    ranks = {n: int(torch.as_tensor(m).sum()) for n, m in masks.items()}
    if not any(ranks.values()):
        raise ValueError("every module was allocated rank 0: nothing to retrain")
    scale = {n: layers[n].scaling for n in masks}
    dropout = {layers[n].dropout for n in masks}
    if len(dropout) > 1:
        raise ValueError(f"the adapters' dropouts differ ({sorted(dropout)}): one plain config cannot hold them")
    adapter_dtype = {layers[n].lora_A.dtype for n in masks}   # the retrained adapters keep the super-network's dtype
    if len(adapter_dtype) > 1:
        raise ValueError(f"the adapters' dtypes differ ({sorted(map(str, adapter_dtype))}): one plain config cannot "
                         "hold them")

    def unwrap(name, layer):
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        lin.weight = layer.weight
        lin.bias = layer.bias
        return lin.train(layer.training)   # apply_adapters gives the new adapter this mode
    kept = {n: k for n, k in ranks.items() if k > 0}
    start = {n: _balanced_factors(layers[n], masks[n], n) for n in kept} if warm else {}
    before = dict(layers)
    replace_modules(model, list(masks), unwrap)
    try:
        # the kept modules' full names, exactly: a list would also match a module whose name ends with one of them
        # (kept "fc" would adapt "block.fc", allocated rank 0)
        apply_adapters(model, exact_targets(kept), r=max(kept.values()), rank_pattern=kept,
                       alpha_pattern={n: scale[n] * k for n, k in kept.items()}, dropout=dropout.pop(),
                       adapter_dtype=adapter_dtype.pop(), modules_to_save=record.get("modules_to_save") or [])
        with torch.no_grad():
            for n, (a, b) in start.items():
                # a component with no singular value (an update of lower rank than the ranks kept) keeps its
                # fresh init (A Kaiming, B = 0), free to learn, rather than starting dead at A = B = 0
                live = (b.norm(dim=0) * a.norm(dim=1) > 0).nonzero().flatten()
                new = model.get_submodule(n)
                new.lora_A[live] = a[live].to(new.lora_A.dtype)
                new.lora_B[:, live] = b[:, live].to(new.lora_B.dtype)
    except BaseException:
        replace_modules(model, list(masks), lambda n, _: before[n])
        if record:
            setattr(model, CONFIG_ATTR, record)
        raise
    return model


@torch.no_grad()
def _update_svd(layer, act: torch.Tensor, name: str = "?"):
    # SVD (float64) of the layer's update over the ranks ``act``: B[:, act]·diag(g[act])·A[act], g = λ in SVD form
    a, b = layer.lora_A[act].double(), layer.lora_B[:, act].double()
    if layer.svd:
        b = b * layer.lora_E[act].double()
    update = b @ a
    if not bool(torch.isfinite(update).all()):
        raise ValueError(f"module {name!r}: its adapter update holds non-finite values (NaN or Inf: the super-network "
                         "diverged); there is no basis to score or keep. Retrain it (a lower lr, gradient clipping)")
    return torch.linalg.svd(update, full_matrices=False)


@torch.no_grad()
def _balanced_factors(layer, mask: torch.Tensor, name: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
    # the kept components' update B[:, kept]·diag(g[kept])·A[kept] (g = λ in SVD form) as A = √S·Vᵀ, B = U·√S
    act = (torch.as_tensor(mask).bool() & layer.rank_mask.bool()).nonzero().flatten()
    u, sv, vh = _update_svd(layer, act, name)
    k = act.numel()
    # the numerical rank's usual cut (S_max · max(out, in) · eps of the adapters' dtype): below it, rounding
    tol = float(sv[0]) * max(layer.out_features, layer.in_features) * torch.finfo(layer.lora_A.dtype).eps \
        if len(sv) else 0.0
    root = torch.where(sv[:k] > tol, sv[:k], 0).sqrt()
    return root[:, None] * vh[:k], u[:, :k] * root


# ---- the super-network's basis --------------------------------------------------------------------------
@torch.no_grad()
def to_merged_basis(model: nn.Module) -> dict[str, torch.Tensor]:
    """Re-expresses every LoRALinear's update in the SVD basis of its merged update, in place.

    ``B·diag(g)·A`` over the active ranks (g = E in SVD form, 1 otherwise) is factored as ``U·diag(S)·Vᵀ``; the
    active slots get ``A = Vᵀ``, ``B = U`` and ``E = S`` (plain form: ``B = U·diag(S)``). ΔW and the layer's outputs
    are unchanged (up to rounding), but the components become orthogonal, so one direction the network learned is
    one player: trained without an orthogonality term, SVD-form components come out near-parallel (|cos| up to
    1.00 measured) and a direction split over several of them lets each take Shapley credit for it.
    Returns module name → the singular values [active rank]. Shared adapters (ShareLoRA) are refused: their A or
    B cannot take one basis per module.
    """
    layers = _layers(model)
    owners: dict[int, list[str]] = {}
    for n, m in layers.items():
        for p in (m.lora_A, m.lora_B):
            owners.setdefault(id(p), []).append(n)
    shared = sorted({n for names in owners.values() if len(names) > 1 for n in names})
    if shared:
        raise ValueError(f"to_merged_basis needs one A and one B per module; these modules share them: {shared}")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise RuntimeError(f"{merged[0]}: unmerge() before changing the basis of a merged layer")
    # every SVD first: a non-finite layer found half-way would leave the earlier layers rewritten
    svds = {}
    for n, m in layers.items():
        act = m.rank_mask.nonzero().flatten()
        if act.numel():   # the rank-k factors only (the full U, Vᵀ of every module at once would be min(N, K) wide)
            u, sv, vh = _update_svd(m, act, n)
            k = act.numel()
            svds[n] = (act, u[:, :k].clone(), sv[:k].clone(), vh[:k].clone())
    out = {}
    for n, (act, u, sv, vh) in svds.items():
        m = layers[n]
        m.lora_A[act] = vh.to(m.lora_A.dtype)
        if m.svd:
            m.lora_B[:, act] = u.to(m.lora_B.dtype)
            m.lora_E[act] = sv.to(m.lora_E.dtype)
        else:
            m.lora_B[:, act] = (u * sv).to(m.lora_B.dtype)
        out[n] = sv.float()
    return out


@contextlib.contextmanager
def orthogonality_hooks(model: nn.Module, weight: float, backwards_per_step: int = 1):
    """Within the block, every backward pass through a LoRALinear's A and B also carries the gradient of
    ``weight · adalora.orthogonality_penalty`` (AdaLoRA's regulariser), so a plain training loss trains the
    SVD-form super-network as if the penalty had been added to it. Gradient hooks, removed on exit.
    ``backwards_per_step``: backward passes per optimizer step (gradient accumulation): each carries its share, so
    a step gets the penalty's gradient once, as when the penalty is added to the step's (averaged) loss."""
    weight = check_finite("weight", weight, lo=0.0)
    if isinstance(backwards_per_step, bool) or not isinstance(backwards_per_step, numbers.Integral) \
            or backwards_per_step < 1:
        raise ValueError(f"backwards_per_step must be an int >= 1, got {backwards_per_step!r}")
    layers = _layers(model)
    params = {id(p): p for m in layers.values() for p in (m.lora_A, m.lora_B)}
    n_terms = 2 * len(layers)   # orthogonality_penalty is a mean over A and B terms of every module
    uses = {}
    for m in layers.values():
        uses[id(m.lora_A)] = uses.get(id(m.lora_A), 0) + 1
        uses[id(m.lora_B)] = uses.get(id(m.lora_B), 0) + 1
    is_a = {id(m.lora_A) for m in layers.values()}

    def make(p):
        scale = float(weight) * uses[id(p)] / n_terms / int(backwards_per_step)

        def hook(grad):
            with torch.enable_grad():
                w = p.detach().requires_grad_(True)
                cov = w @ w.T if id(p) in is_a else w.T @ w
                pen = torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device))
                g, = torch.autograd.grad(pen, w)
            return grad + scale * g.to(grad.dtype)
        return hook

    handles = [p.register_hook(make(p)) for p in params.values()] if weight > 0 else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class SupernetNotLearnedError(RuntimeError):
    """The super-network's validation loss (or accuracy) did not move enough for its Shapley scores to mean
    anything: allocating from them would hand noise to the allocator."""


def _fit_check(model, batches, loss_fn, predict_fn) -> dict:
    was_training = model.training
    model.eval()
    try:
        out = {"val_loss": _val_loss(model, batches, loss_fn)}
        if predict_fn is not None:
            correct, labels = 0, []
            with torch.no_grad():
                for batch in batches:
                    pred, lab = predict_fn(model, batch)
                    lab = torch.as_tensor(lab).reshape(-1).cpu()
                    correct += int((torch.as_tensor(pred).reshape(-1).cpu() == lab).sum())
                    labels.append(lab)
            labels = torch.cat(labels)
            out["val_accuracy"] = correct / labels.numel()
            out["majority_rate"] = float(torch.unique(labels, return_counts=True)[1].max()) / labels.numel()
    finally:
        model.train(was_training)
    return out


def _learned(before: dict, after: dict, min_improvement: float | None) -> bool:
    if min_improvement is None:
        return True
    ok = after["val_loss"] <= (1.0 - min_improvement) * before["val_loss"]
    if "val_accuracy" in after:
        ok = ok and after["val_accuracy"] > after["majority_rate"]
    return bool(ok)


def _spearman(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    from scipy.stats import spearmanr

    x = torch.cat([a[n].reshape(-1) for n in a])
    y = torch.cat([b[n].reshape(-1) for n in a])
    ok = ~(torch.isnan(x) | torch.isnan(y))
    if int(ok.sum()) < 2 or torch.equal(x[ok], y[ok]):
        return 1.0
    rho = spearmanr(x[ok].numpy(), y[ok].numpy()).statistic
    return float(rho) if math.isfinite(rho) else 0.0


def _check_scoring_args(mode, num_passes, loss_fn) -> None:
    if mode not in ("taylor", "permutation", "exact"):
        raise ValueError(f"mode must be 'taylor', 'permutation' or 'exact', got {mode!r}")
    if isinstance(num_passes, bool) or not isinstance(num_passes, numbers.Integral) or num_passes < 1:
        raise ValueError(f"num_passes must be an int >= 1, got {num_passes!r}")
    if loss_fn is None or not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (model, batch) -> per-example losses [B], got {loss_fn!r}")


def _check_by(by) -> None:
    if by not in ("signed", "abs"):
        raise ValueError(f"by must be 'signed' or 'abs', got {by!r}")


def _check_allocation_args(rounds, budget_unit, retrain, basis, mode, num_passes, by, loss_fn, min_stability,
                           split_validation=False) -> None:
    # everything that can be checked without the model: a workflow refuses it before training the super-network
    if not isinstance(split_validation, bool):
        raise TypeError(f"split_validation must be True or False, got {split_validation!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    _check_scoring_args(mode, num_passes, loss_fn)
    _check_by(by)
    check_finite("min_stability", min_stability)
    if budget_unit not in BUDGET_UNITS:
        raise ValueError(f"budget_unit must be one of {BUDGET_UNITS}, got {budget_unit!r}")
    if retrain not in RETRAIN_FORMS:
        raise ValueError(f"retrain must be one of {RETRAIN_FORMS}, got {retrain!r}")
    if basis not in ("merged", "trained"):
        raise ValueError(f"basis must be 'merged' or 'trained', got {basis!r}")


def _scoring_halves(val_batches: list, split: bool) -> tuple[list, list]:
    """The batches of the two independent scorings: all of them twice, or (``split``) the even and the odd ones."""
    if not split:
        return val_batches, val_batches
    if len(val_batches) < 2:
        raise ValueError(f"split_validation needs at least 2 validation batches (one per scoring), got "
                         f"{len(val_batches)}")
    return val_batches[0::2], val_batches[1::2]


def _score_half(supernet, batches, k: int, split: bool, mode, loss_fn, num_passes, generator, batch_size_fn):
    """One of the two scorings (k = 0, 1): φ, standard errors and the examples it rests on."""
    try:
        return _shapley(supernet, batches, mode, loss_fn, num_passes, None, 16, generator, batch_size_fn)
    except _NoExamples as e:
        if split:
            raise _NoExamples(f"split_validation: in the {('even', 'odd')[k]}-numbered validation batches, {e}; each "
                              "half needs examples with a finite loss (or score without split_validation)") from None
        raise


def _resolve_budget(supernet: nn.Module, budget, budget_unit: str = "ranks", retrain: str = "plain"):
    """``budget`` checked against what ``supernet`` can give: (budget, the most it can give, per-rank costs or
    None for a rank budget). ``budget`` None: just the most."""
    layers = _layers(supernet)
    if not layers:
        raise ValueError("the super-network has no LoRALinear adapters (apply_adapters(..., svd=True) first)")
    start = sum(int(m.rank_mask.sum()) for m in layers.values())
    if budget_unit == "ranks":
        if budget is not None:
            budget = check_budget(budget, 1, start, f"the super-network's {start} ranks over {len(layers)} modules")
        return budget, start, None
    costs = rank_costs(supernet, retrain)
    most = sum(costs[n] * int(m.rank_mask.sum()) for n, m in layers.items())
    if budget is not None:
        budget = check_budget(budget, min(costs.values()), most,
                              f"the parameters of one rank up to all {start} ranks of the super-network", "budget")
    return budget, most, costs


def shaplora_allocate(
    supernet: nn.Module,
    val_batches: Iterable,
    budget: int,
    *,
    loss_fn: LossFn,
    budget_unit: str = "ranks",
    retrain: str = "plain",
    rounds: int = 1,
    mode: str = "taylor",
    num_passes: int = 1,
    by: str = "signed",
    generator: torch.Generator | None = None,
    basis: str = "merged",
    min_stability: float = 0.5,
    batch_size_fn: Callable[[Any], int] | None = None,
    split_validation: bool = False,
) -> dict:
    """ShapLoRA's allocation step on a super-network you trained (and checked: :func:`shaplora_workflow` does
    both): in each of ``rounds`` rounds, re-express each module's update in its merged SVD basis (``basis``
    ``"merged"``), Shapley-score it twice independently on ``val_batches``, keep the best ranks of the two
    scorings' mean within the round's budget and mask the rest in ``supernet`` (``rounds`` > 1 prunes
    geometrically, rescoring in between).

    Args:
        budget: total ranks (``budget_unit`` ``"ranks"``) or the trainable parameters the kept ranks add once
            retrained in ``retrain``'s form (``"params"``, :func:`rank_costs`). Checked against the super-network.
        generator: the coalitions' RNG (None: a fresh unseeded draw).
        min_stability: a RuntimeWarning when the two scorings' Spearman ρ is below it.
        split_validation: score the two independent scorings on alternate halves of ``val_batches`` (even and odd
            batches; at least 2) instead of both on all of it: half the cost, every example still scored once;
            the scores are the two halves' example-weighted mean, and the stability compares scorings on
            different examples (a stricter test than two scorings of the same ones).
        Other arguments as :func:`shaplora_workflow` and :func:`shapley_sensitivity`.
    Returns:
        dict with ``masks`` (module → bool [R], also applied to ``supernet``), ``scores`` (the last round's),
        ``budget`` (as checked), ``score_stability`` (first round's ρ) and ``score_stability_rounds``.
    """
    _check_allocation_args(rounds, budget_unit, retrain, basis, mode, num_passes, by, loss_fn, min_stability,
                           split_validation)
    check_budget(budget, 1, 1 << 62)   # an int (not None, not a float): the range is checked just below
    budget, full, costs = _resolve_budget(supernet, budget, budget_unit, retrain)
    val_batches = list(val_batches)
    if not val_batches:
        raise ValueError("val_batches is empty: no validation examples")
    halves = _scoring_halves(val_batches, split_validation)
    scores, masks, stability = None, None, []
    # all or nothing: an error in any round (a bad loss, a merged layer) gives the super-network back as it came
    saved = {n: [None if t is None else t.detach().clone() for t in (m.lora_A, m.lora_B, m.lora_E, m.rank_mask)]
             for n, m in _layers(supernet).items()}
    try:
        for k in range(1, rounds + 1):
            if basis == "merged":
                to_merged_basis(supernet)
            (first, _, n1), (second, _, n2) = (_score_half(supernet, part, k, split_validation, mode, loss_fn,
                                                           num_passes, generator, batch_size_fn)
                                               for k, part in enumerate(halves))
            stability.append(_spearman(first, second))
            if stability[-1] < min_stability:
                warnings.warn(f"ShapLoRA scores are unstable: two independent scorings agree with Spearman ρ = "
                              f"{stability[-1]:.2f} < {min_stability} (round {k}); raise num_passes or use more "
                              "validation examples", RuntimeWarning, stacklevel=2)
            # each scoring's mean weighted by the examples it rests on (equal when both scored all of them)
            scores = {n: (n1 * first[n] + n2 * second[n]) / (n1 + n2) for n in first}
            b_k = round(full * (budget / full) ** (k / rounds)) if k < rounds else budget
            masks = allocate_ranks(scores, int(b_k), by=by, costs=costs)
            apply_rank_masks(supernet, masks)
    except BaseException:
        with torch.no_grad():
            for n, m in _layers(supernet).items():
                for live, old in zip((m.lora_A, m.lora_B, m.lora_E, m.rank_mask), saved[n]):
                    if old is not None:
                        live.copy_(old)
        raise
    return {"masks": masks, "scores": scores, "budget": budget, "score_stability": stability[0],
            "score_stability_rounds": stability}


def shaplora_workflow(
    build_model: Callable[[], nn.Module],
    train: Callable[[nn.Module], Any],
    val_batches: Iterable,
    evaluate: Callable[[nn.Module], Any],
    *,
    loss_fn: LossFn,
    r_target: int | None = None,
    budget: int | None = None,
    budget_unit: str = "ranks",
    retrain: str = "plain",
    rounds: int = 1,
    mode: str = "taylor",
    num_passes: int = 1,
    by: str = "signed",
    seed: int = 0,
    basis: str = "merged",
    orth_reg: float = 0.0,
    predict_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]] | None = None,
    min_improvement: float | None = 0.05,
    max_extra_train: int = 2,
    min_stability: float = 0.5,
    batch_size_fn: Callable[[Any], int] | None = None,
    split_validation: bool = False,
) -> dict:
    """ShapLoRA, workflows (a) and (b): train the super-network at r_init → check it learned → Shapley-score
    on the validation split (twice, independently: the mean is allocated, the agreement reported) → keep the
    global top-``budget`` triplets (``rounds`` > 1 prunes geometrically and rescores in between) → build a
    FRESH model with the rank pattern (plain LoRA by default), train it from scratch → evaluate.

    Args:
        build_model: returns a new model with SVD-form LoRALinear adapters at r_init (fresh init each call).
        train: trains a model in place with a plain loss. It may be called again on the super-network (at
            most ``max_extra_train`` times, with a warning) when the super-network has not learned.
        val_batches: validation batches (not the training split).
        evaluate: returns the held-out test result of a trained model.
        r_target / budget: the rank budget, exactly one of them: ``r_target`` ranks per module on average
            (budget = r_target × #modules) or ``budget`` ranks in total (any integer, e.g. 7 over 12 modules).
            Both are checked before any training.
        budget_unit: ``"ranks"`` (``budget`` counts ranks) or ``"params"`` (``budget`` counts the trainable
            parameters the kept ranks add in the retrained form, :func:`rank_costs`; e.g. uniform LoRA's adapter
            parameters for an equal-parameter comparison: modules differ in ``in + out``, so equal ranks are not
            equal parameters). ``r_target`` is always in ranks.
        retrain: ``"plain"`` (default): the retrained model is plain LoRA with the rank pattern
            (:func:`to_plain_lora`, fresh LoRA init, the super-network's scale), what a PEFT user runs;
            ``"svd"``: SVD-form adapters at r_init with the rank masks (started as ``build_model`` starts them:
            λ = 0 under AdaLoRA's init, λ = 1 under ``svd_init="lora"``);
            ``"warm"``: the super-network itself (its heads too) becomes plain LoRA with the rank pattern,
            started from its kept components (:func:`to_plain_lora` ``warm=True``), and ``train`` continues it.
        basis: ``"merged"`` (default) scores each module's update in the SVD basis of its merged update
            (:func:`to_merged_basis`), so one learned direction is one player; ``"trained"`` scores the
            components as trained.
        orth_reg: weight of AdaLoRA's orthogonality penalty added to the super-network's gradients
            (:func:`orthogonality_hooks`); the user's loss stays plain. 0 = off.
        predict_fn: for classification, ``(model, batch) -> (predicted labels, true labels)``: the super-network
            must then also beat the majority class of the validation labels.
        min_improvement: the super-network's validation loss must fall by at least this fraction from the
            untrained model's, else its training is extended, then :class:`SupernetNotLearnedError` is raised.
            None skips the check (plumbing tests with a few steps only: the scores are then unchecked).
        min_stability: a warning is issued when the Spearman correlation of the two scorings is below it.
        split_validation: the two scorings on alternate halves of ``val_batches`` (half the scoring cost; see
            :func:`shaplora_allocate`).
    Returns:
        dict with ``masks``, ``scores``, ``peft_rank_pattern``, ``config`` (this package's), ``result``,
        ``model`` (the retrained one), ``rng_state`` (the coalition generator's state before scoring),
        ``budget`` (total ranks kept), ``score_stability`` (Spearman ρ of the two scorings, first round;
        ``score_stability_rounds`` every round) and ``supernet`` (validation loss / accuracy before and after
        training, the majority rate, the number of extra ``train`` calls).
    """
    _check_allocation_args(rounds, budget_unit, retrain, basis, mode, num_passes, by, loss_fn, min_stability,
                           split_validation)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if r_target is not None and budget_unit != "ranks":
        raise ValueError("r_target counts ranks: pass budget=... with budget_unit='params'")
    if (r_target is None) == (budget is None):
        raise ValueError("give exactly one of r_target (ranks per module) and budget (total ranks), got "
                         f"r_target={r_target!r}, budget={budget!r}")
    if r_target is not None:
        check_budget(r_target, 1, 1 << 62, name="r_target")
    else:
        check_budget(budget, 1, 1 << 62)
    if isinstance(max_extra_train, bool) or not isinstance(max_extra_train, numbers.Integral) or max_extra_train < 0:
        raise ValueError(f"max_extra_train must be an int >= 0, got {max_extra_train!r}")
    if min_improvement is not None and not 0.0 <= min_improvement < 1.0:
        raise ValueError(f"min_improvement must be in [0, 1) or None, got {min_improvement!r}")
    val_batches = list(val_batches)
    if not val_batches:
        raise ValueError("val_batches is empty: no validation examples")
    _scoring_halves(val_batches, split_validation)   # checked before any training
    gen = torch.Generator().manual_seed(seed)
    supernet = build_model()
    players = _resolve_budget(supernet, None)[1]   # the super-network's ranks: the players of the game
    if r_target is not None:
        budget = check_budget(int(r_target) * len(_layers(supernet)), 1, players,
                              f"the super-network's {players} ranks", "r_target·modules")
    budget = _resolve_budget(supernet, budget, budget_unit, retrain)[0]   # checked before any training
    if mode == "exact" and players > MAX_EXACT_PLAYERS:
        raise ValueError(f"mode='exact' enumerates 2^n coalitions of the super-network's {players} ranks: at most "
                         f"{MAX_EXACT_PLAYERS}; use mode='taylor' or 'permutation'")
    before = _fit_check(supernet, val_batches, loss_fn, predict_fn)
    need = (f"a validation loss {min_improvement or 0:.0%} lower"
            f"{' and accuracy above the majority class' * bool(predict_fn)}")
    extra = 0
    with orthogonality_hooks(supernet, orth_reg):
        train(supernet)
        after = _fit_check(supernet, val_batches, loss_fn, predict_fn)
        while not _learned(before, after, min_improvement) and extra < max_extra_train:
            extra += 1
            warnings.warn(f"ShapLoRA super-network has not learned (validation {after} vs untrained {before}; "
                          f"needs {need}): training it again ({extra}/{max_extra_train})", RuntimeWarning,
                          stacklevel=2)
            train(supernet)
            after = _fit_check(supernet, val_batches, loss_fn, predict_fn)
    if not _learned(before, after, min_improvement):
        raise SupernetNotLearnedError(
            f"the ShapLoRA super-network did not learn after {1 + extra} train calls: validation {after} vs "
            f"untrained {before} (needs {need}); its Shapley scores would be noise. "
            "Train it longer or with a higher learning rate.")
    rng_state = gen.get_state()
    alloc = shaplora_allocate(supernet, val_batches, budget, loss_fn=loss_fn, budget_unit=budget_unit,
                              retrain=retrain, rounds=rounds, mode=mode, num_passes=num_passes, by=by, generator=gen,
                              basis=basis, min_stability=min_stability, batch_size_fn=batch_size_fn,
                              split_validation=split_validation)
    masks = alloc["masks"]
    if retrain == "warm":
        model = to_plain_lora(supernet, masks, warm=True)
    else:
        model = build_model()
        # the retrain must start fresh: the same object (or one sharing its tensors) would carry the trained
        # super-network's adapters and head into a run reported as "from scratch"
        shared = {id(p) for p in supernet.parameters()} & {id(p) for p in model.parameters() if p.requires_grad}
        if model is supernet or shared:
            raise ValueError("build_model must return a new model on each call: the retrain got the super-network "
                             f"{'itself' if model is supernet else f'with {len(shared)} shared trainable tensors'}")
        if retrain == "plain":
            to_plain_lora(model, masks)
        else:
            apply_rank_masks(model, masks)
    train(model)
    fit = {"val_loss_untrained": before["val_loss"], "val_loss": after["val_loss"], "extra_train_calls": extra}
    if predict_fn is not None:
        fit.update(val_accuracy=after["val_accuracy"], majority_rate=after["majority_rate"],
                   val_accuracy_untrained=before["val_accuracy"])
    return {**alloc, "peft_rank_pattern": to_peft_rank_pattern(masks), "config": rank_pattern_config(masks),
            "result": evaluate(model), "model": model, "rng_state": rng_state, "budget_unit": budget_unit,
            "supernet": fit}
