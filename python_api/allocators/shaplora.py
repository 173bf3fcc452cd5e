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
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lora_kernels import __version__
from lora_kernels.sensitivity import per_example_gate_grad

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
    if num_permutations < 1:
        raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
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
        self.saved = {n: m.rank_mask.clone() for n, m in self.layers.items()}
        self.index = [(n, i) for n, m in self.layers.items() for i in m.rank_mask.nonzero().flatten().tolist()]
        if not self.index:
            raise ValueError("every rank of every LoRALinear is masked: no players")

    def split(self, flat: torch.Tensor, fill: float = float("nan")) -> dict[str, torch.Tensor]:
        """Player vector [..., N] → module name → [..., R] (non-players get ``fill``)."""
        out = {n: flat.new_full((*flat.shape[:-1], m.r), fill) for n, m in self.layers.items()}
        for j, (n, i) in enumerate(self.index):
            out[n][..., i] = flat[..., j]
        return out

    def restore(self):
        for n, m in self.layers.items():
            m.set_rank_mask(self.saved[n])
            m.set_token_gate(None)


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
        raise ValueError("batches is empty: no validation examples")
    if cnt == 0:
        raise ValueError(f"every validation loss is non-finite (NaN/Inf) ({seen} of {seen} examples)")
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
    if seen == 0:
        raise ValueError("batches is empty: no validation examples")
    if count == 0:
        raise ValueError(f"every validation example has a non-finite (NaN/Inf) loss or gate gradient "
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
    if mode not in ("taylor", "permutation", "exact"):
        raise ValueError(f"mode must be 'taylor', 'permutation' or 'exact', got {mode!r}")
    if loss_fn is None or not callable(loss_fn):
        raise TypeError("loss_fn(model, batch) -> per-example losses [B] is required")
    if num_passes < 1:
        raise ValueError(f"num_passes must be >= 1, got {num_passes}")
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
        players.restore()
        model.train(was_training)
    if skipped.get("n"):
        warnings.warn(f"shapley_sensitivity: skipped {skipped['n']} of {skipped['of']} validation examples with a "
                      "non-finite (NaN/Inf) loss or gate gradient", RuntimeWarning, stacklevel=2)
    if not bool(torch.isfinite(phi).all()):
        raise ValueError("shapley_sensitivity: the scores overflow float64 (the losses or their gradients are too "
                         "large); rescale loss_fn")
    scores = players.split(phi)
    if not return_stats:
        return scores
    return scores, players.split(se if se is not None else torch.zeros_like(phi))


# ---- allocation and export ----------------------------------------------------------------------------
def allocate_ranks(scores: dict[str, torch.Tensor], budget: int, *, by: str = "signed") -> dict[str, torch.Tensor]:
    """Keep the global top-``budget`` rank triplets.

    Args:
        scores: module name → [R] scores (NaN = not a candidate, e.g. already pruned).
        budget: total ranks kept over all modules (B = r_target × #modules in ShapLoRA).
        by: ``"signed"`` ranks by φ (a rank that raises the loss ranks last), ``"abs"`` by |φ| (AdaLoRA-like).
    Returns:
        module name → bool mask [R]. Ties break toward the earlier (module, rank).
    """
    if by not in ("signed", "abs"):
        raise ValueError(f"by must be 'signed' or 'abs', got {by!r}")
    if not scores:
        raise ValueError("scores is empty")
    names = list(scores)
    flat = torch.cat([torch.as_tensor(scores[n]).detach().double().cpu().reshape(-1) for n in names])
    inf = [n for n in names if bool(torch.isinf(torch.as_tensor(scores[n]).detach().double()).any())]
    if inf:  # ±inf would tie with the NaN (not a candidate) key below
        raise ValueError(f"scores of modules {inf} contain ±Inf; scores must be finite (NaN = not a candidate)")
    valid = ~torch.isnan(flat)
    if not isinstance(budget, int) or not 0 <= budget <= int(valid.sum()):
        raise ValueError(f"budget must be an int in [0, {int(valid.sum())}] (the number of scored ranks), "
                         f"got {budget!r}")
    key = flat.abs() if by == "abs" else flat.clone()
    key[~valid] = -math.inf
    order = torch.sort(key, descending=True, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:budget]] = True
    out, off = {}, 0
    for n in names:
        r = torch.as_tensor(scores[n]).numel()
        out[n] = keep[off: off + r].clone()
        off += r
    return out


def to_peft_rank_pattern(masks: dict[str, torch.Tensor]) -> dict[str, int]:
    """module name → kept rank, for PEFT's ``LoraConfig(rank_pattern=...)`` (modules with rank 0 left out:
    PEFT cannot build a rank-0 LoRA; drop them from ``target_modules`` too, see :func:`to_peft_lora_config`)."""
    return {n: int(m.sum()) for n, m in masks.items() if int(m.sum()) > 0}


def to_peft_lora_config(masks: dict[str, torch.Tensor], lora_alpha: float, **kwargs):
    """A PEFT ``LoraConfig`` with the allocated per-module ranks (``r`` = the largest, ``rank_pattern`` the rest)."""
    from peft import LoraConfig

    pattern = to_peft_rank_pattern(masks)
    if not pattern:
        raise ValueError("every module was allocated rank 0")
    return LoraConfig(r=max(pattern.values()), lora_alpha=lora_alpha, target_modules=list(pattern),
                      rank_pattern=dict(pattern), **kwargs)


def rank_pattern_config(masks: dict[str, torch.Tensor]) -> dict:
    """This package's JSON-able allocation: module → {"r_init", "kept" (rank indices)}."""
    return {"format": "lora_kernels.rank_pattern", "version": __version__,
            "modules": {n: {"r_init": int(m.numel()), "kept": m.nonzero().flatten().tolist()}
                        for n, m in masks.items()}}


def masks_from_config(cfg: dict | str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`rank_pattern_config` (accepts the dict or its JSON text)."""
    cfg = json.loads(cfg) if isinstance(cfg, str) else cfg
    if cfg.get("format") != "lora_kernels.rank_pattern":
        raise ValueError(f"not a lora_kernels rank pattern (format={cfg.get('format')!r})")
    out = {}
    for n, spec in cfg["modules"].items():
        m = torch.zeros(spec["r_init"], dtype=torch.bool)
        m[spec["kept"]] = True
        out[n] = m
    return out


def apply_rank_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Sets each named LoRALinear's rank mask (the layer then computes on its active ranks only)."""
    layers = _layers(model)
    unknown = sorted(set(masks) - set(layers))
    if unknown:
        raise KeyError(f"masks name modules that are not LoRALinear layers of the model: {unknown}")
    for n, m in masks.items():
        layers[n].set_rank_mask(m)


def shaplora_workflow(
    build_model: Callable[[], nn.Module],
    train: Callable[[nn.Module], Any],
    val_batches: Iterable,
    evaluate: Callable[[nn.Module], Any],
    *,
    loss_fn: LossFn,
    r_target: int,
    rounds: int = 1,
    mode: str = "taylor",
    num_passes: int = 1,
    by: str = "signed",
    seed: int = 0,
) -> dict:
    """ShapLoRA, workflows (a) and (b): train the super-network at r_init → Shapley-score on the validation
    split → keep the global top-B triplets (B = r_target × #modules; ``rounds`` > 1 prunes geometrically and
    rescores in between) → build a FRESH model, apply the rank pattern, train it from scratch → evaluate.

    Args:
        build_model: returns a new model with SVD-form LoRALinear adapters at r_init (fresh init each call).
        train: trains a model in place (add ``γ·adalora.orthogonality_penalty(model)`` to its loss for the
            super-network, as AdaLoRA does).
        val_batches: validation batches (not the training split).
        evaluate: returns the held-out test result of a trained model.
    Returns:
        dict with ``masks``, ``scores``, ``peft_rank_pattern``, ``config`` (this package's), ``result``,
        ``model`` (the retrained one) and ``rng_state`` (the coalition generator's state before scoring).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    val_batches = list(val_batches)
    gen = torch.Generator().manual_seed(seed)
    rng_state = gen.get_state()
    supernet = build_model()
    train(supernet)
    layers = _layers(supernet)
    start = sum(int(m.rank_mask.sum()) for m in layers.values())
    budget = int(r_target) * len(layers)
    if not 0 < budget <= start:
        raise ValueError(f"budget r_target·modules = {budget} must be in (0, {start}]")
    scores, masks = None, None
    for k in range(1, rounds + 1):
        scores = shapley_sensitivity(supernet, val_batches, mode, loss_fn=loss_fn, num_passes=num_passes,
                                     generator=gen)
        b_k = round(start * (budget / start) ** (k / rounds)) if k < rounds else budget
        masks = allocate_ranks(scores, int(b_k), by=by)
        apply_rank_masks(supernet, masks)
    model = build_model()
    apply_rank_masks(model, masks)
    train(model)
    return {"masks": masks, "scores": scores, "peft_rank_pattern": to_peft_rank_pattern(masks),
            "config": rank_pattern_config(masks), "result": evaluate(model), "model": model, "rng_state": rng_state}
