"""Model surgery: put :class:`LoRALinear` layers in place of targeted ``nn.Linear`` layers, count, merge.

Works on Hugging Face models and plain ``nn.Module`` trees alike (only module names and ``nn.Linear`` are used).
The configuration is recorded on the model as ``model._lora_kernels_config`` (a JSON-able dict) so a checkpoint
can rebuild the same adapters, sharing included, with :func:`apply_from_config`.

Merge choice: :func:`merge_adapters` *replaces* every adapter layer with a plain ``nn.Linear`` holding
``W + s·B_l·diag(g)·A`` (computed in fp32, rounded once to W's dtype). By default this is done in place on the
base weight (no copy, not reversible). With ``reversible=True`` the adapter layers are kept aside with their
original weights (one extra copy of the targeted base weights) and :func:`unmerge_adapters` puts them back
bit-exactly.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from lora_kernels import __version__

from .layers import LoRALinear
from .share import ACCUMULATE, ATTENTION_NAMES, SCOPES, SHARE_MODES, SharedLoRALinear, ShareGroup, group_key

CONFIG_ATTR = "_lora_kernels_config"
_STASH_ATTR = "_lora_kernels_unmerged"
# apply_adapters arguments stored in the config (what apply_from_config replays)
_APPLY_KEYS = ("target_modules", "r", "alpha", "dropout", "share", "share_scope", "rank_pattern", "svd",
               "modules_to_save", "accumulate", "reuse_shrink")


def _matches(name: str, keys) -> bool:
    """PEFT's rule: a str is a regex on the full name; a list matches the full name or its last components."""
    if isinstance(keys, str):
        return re.fullmatch(keys, name) is not None
    return any(name == k or name.endswith("." + k) for k in keys)


def _lookup(name: str, pattern: dict | None, default):
    for k, v in (pattern or {}).items():
        if name == k or name.endswith("." + k):
            return v
    return default


def _targets(model: nn.Module, target_modules) -> list[str]:
    names = []
    for name, mod in model.named_modules():
        if not name or not _matches(name, target_modules):
            continue
        if isinstance(mod, LoRALinear):
            raise ValueError(f"module {name!r} is already a LoRALinear: apply_adapters was called twice")  # noqa: TRY004  # noqa: TRY004
        if type(mod).__name__ == "Conv1D":
            raise TypeError(f"module {name!r} is a GPT-2 style Conv1D (weight stored [in, out]); LoRALinear wraps "
                            "nn.Linear only. Target a model with nn.Linear projections, or convert the Conv1D "
                            "to nn.Linear (transpose its weight) before applying adapters")
        if isinstance(mod, nn.Linear):
            names.append(name)
        elif not list(mod.children()):
            raise TypeError(f"module {name!r} matches target_modules but is a {type(mod).__name__}, "
                            "not an nn.Linear")
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear; some linear layers of this "
                         f"model: {linears}")
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_adapters(model: nn.Module, target_modules: Iterable[str] | str, r: int = 8, alpha: float | None = None,
                   dropout: float = 0.0, *, share: str | None = None, share_scope: str = "module_type",
                   rank_pattern: dict[str, int] | None = None, rank_masks: dict | None = None, svd: bool = False,
                   modules_to_save: Iterable[str] | None = None, adapter_dtype: torch.dtype | None = None,
                   accumulate: str = "inplace", reuse_shrink: bool = True,
                   attention_names=ATTENTION_NAMES) -> nn.Module:
    """Replaces the targeted ``nn.Linear`` layers of ``model`` by LoRA layers, in place, and returns ``model``.

    Args:
        target_modules: list of names or last-name suffixes (``["query", "value"]``, ``["q_proj"]``), or one
            regex on the full module name (PEFT's rule).
        r, alpha, dropout: rank, scale numerator (``s = alpha / r``; alpha defaults to r), LoRA-input dropout.
        share: None (plain LoRA), ``"A"`` (ShareA), ``"B"`` or ``"AB"`` — matrices shared by reference.
        share_scope: ``"module_type"`` (one matrix per module type, across layers) or ``"attention"`` (one
            matrix across q, k, v of all layers; other targets keep the module-type scope).
        rank_pattern: module name or suffix -> r for that module (PEFT's ``rank_pattern``).
        rank_masks: module name or suffix -> 0/1 mask [r] applied with ``set_rank_mask``.
        svd: SVD-form adapters ``ΔW = B diag(E) A`` (AdaLoRA / ShapLoRA); E is never shared.
        modules_to_save: names or suffixes of modules kept trainable (a task head such as ``"classifier"``).
        accumulate: ``"inplace"`` (shared gradients added in place into one buffer) or ``"autograd"``.
        reuse_shrink: compute ``H = x Aᵀ`` once for projections sharing A on the same input.
    Every base parameter is frozen. GPT-2 ``Conv1D`` layers are refused (TypeError).
    """
    if share not in SHARE_MODES:
        raise ValueError(f"share must be None, 'A', 'B' or 'AB', got {share!r}")
    if share_scope not in SCOPES:
        raise ValueError(f"share_scope must be one of {SCOPES}, got {share_scope!r}")
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be one of {ACCUMULATE}, got {accumulate!r}")
    if isinstance(target_modules, str):
        targets_spec = target_modules
    else:
        targets_spec = list(target_modules)
        if not targets_spec:
            raise ValueError("target_modules is empty")
    names = _targets(model, targets_spec)
    for p in model.parameters():
        p.requires_grad_(False)

    shared_params = SHARE_MODES[share]
    keys = {n: group_key(n, share_scope, attention_names) for n in names}
    groups: dict[str, ShareGroup] = {}
    owners: dict[str, tuple[str, LoRALinear]] = {}   # group id -> (first module, its layer)
    for name in names:
        base = model.get_submodule(name)
        rank = int(_lookup(name, rank_pattern, r))
        mine = {}
        for pname in shared_params:
            gid = f"{keys[name]}.{pname}"
            if gid in owners:
                owner_name, owner = owners[gid]
                want = (rank, base.in_features) if pname == "lora_A" else (base.out_features, rank)
                have = tuple(getattr(owner, pname).shape)
                if have != want:
                    raise ValueError(f"cannot share {pname} of {name!r} with {owner_name!r}: shapes {want} vs {have} "
                                     f"(share_scope={share_scope!r}, r={rank}); use another scope or rank")
                mine[pname] = getattr(owner, pname)
        cls = SharedLoRALinear if shared_params else LoRALinear
        layer = cls.from_linear(base, rank, alpha, dropout, svd=svd, lora_A=mine.get("lora_A"),
                                lora_B=mine.get("lora_B"), adapter_dtype=adapter_dtype)
        if shared_params:
            grp = {}
            for pname in shared_params:
                gid = f"{keys[name]}.{pname}"
                if gid not in owners:
                    owners[gid] = (name, layer)
                    groups[gid] = ShareGroup(gid, pname, multi_type=keys[name] != _type_of(name))
                groups[gid].modules.append(name)
                grp[pname] = groups[gid]
            layer.configure_sharing(grp.get("lora_A"), grp.get("lora_B"), accumulate, reuse_shrink)
        mask = _lookup(name, rank_masks, None)
        if mask is not None:
            layer.set_rank_mask(mask)
        _replace(model, name, layer)

    saved = []
    if modules_to_save:
        for n, m in model.named_modules():
            if n and _matches(n, list(modules_to_save)):
                saved.append(n)
                for p in m.parameters():
                    p.requires_grad_(True)
        if not saved:
            raise ValueError(f"modules_to_save={list(modules_to_save)!r} matches no module")

    setattr(model, CONFIG_ATTR, {
        "method": "sharelora" if share else ("svd_lora" if svd else "lora"),
        "version": __version__,
        "target_modules": targets_spec, "r": r, "alpha": alpha, "dropout": dropout,
        "share": share, "share_scope": share_scope, "rank_pattern": dict(rank_pattern or {}), "svd": svd,
        "modules_to_save": list(modules_to_save or []), "accumulate": accumulate, "reuse_shrink": reuse_shrink,
        "adapted_modules": names,
        # shared matrix id -> the modules holding that one Parameter (the first one owns it in checkpoints)
        "sharing": {gid: list(g.modules) for gid, g in groups.items()},
    })
    return model


def _type_of(name: str) -> str:
    return group_key(name, "module_type")


def apply_from_config(model: nn.Module, config: dict) -> nn.Module:
    """Replays :func:`apply_adapters` from a recorded ``_lora_kernels_config`` (checkpoint loading) and checks
    that the sharing map comes out identical."""
    kwargs = {k: config[k] for k in _APPLY_KEYS if k in config}
    apply_adapters(model, **kwargs)
    got = getattr(model, CONFIG_ATTR)["sharing"]
    if "sharing" in config and got != config["sharing"]:
        raise ValueError(f"rebuilt sharing map {got} differs from the recorded one {config['sharing']}")
    return model


def adapter_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every adapter layer of ``model`` by module name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def count_trainable(model: nn.Module, adapters_only: bool = False) -> int:
    """Number of trainable scalars, each Parameter counted once however many layers share it.

    ``adapters_only`` counts the adapter matrices (A, B, E) only, leaving out a trainable head."""
    if adapters_only:
        seen = {id(p): p for m in adapter_layers(model).values() for p in m.parameters() if p.requires_grad}
        return sum(p.numel() for p in seen.values())
    return sum(p.numel() for p in model.parameters() if p.requires_grad)   # parameters() yields each once


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors (A, B, E, rank masks) and trainable non-adapter parameters, each tensor stored ONCE:
    a shared matrix appears under its first module's key only. Safe for ``safetensors.torch.save_file``."""
    out, seen = {}, set()
    for name, layer in adapter_layers(model).items():
        for pname in ("lora_A", "lora_B", "lora_E", "rank_mask"):
            t = getattr(layer, pname, None)
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out[f"{name}.{pname}"] = t.detach()
    for pname, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[pname] = p.detach()
    return out


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copies ``state`` into the model's adapter tensors in place, so sharing by reference is kept. Accepts
    :func:`adapter_state_dict` output (each shared matrix once) or a full ``state_dict`` (every alias)."""
    aliases: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, layer in adapter_layers(model).items():
        for pname in ("lora_A", "lora_B", "lora_E", "rank_mask"):
            t = getattr(layer, pname, None)
            if t is not None:
                aliases.setdefault(id(t), (t, []))[1].append(f"{name}.{pname}")
    for pname, p in model.named_parameters():
        if p.requires_grad and id(p) not in aliases:
            aliases[id(p)] = (p, [pname])
    used = set()
    for t, keys in aliases.values():
        present = [k for k in keys if k in state]
        if not present:
            if strict:
                raise KeyError(f"checkpoint has no entry for {keys[0]!r} (shared by {len(keys)} modules)")
            continue
        src = state[present[0]]
        for k in present[1:]:
            if not torch.equal(state[k], src):
                raise ValueError(f"{k!r} and {present[0]!r} hold one shared matrix but differ in the checkpoint")
        if tuple(src.shape) != tuple(t.shape):
            raise ValueError(f"{present[0]!r}: checkpoint shape {tuple(src.shape)} != model shape {tuple(t.shape)}")
        t.copy_(src)
        used.update(present)
    if strict:
        extra = [k for k in state if k not in used]
        if extra:
            raise KeyError(f"unexpected keys in adapter checkpoint: {extra[:8]}")


@torch.no_grad()
def _merged_linear(layer: LoRALinear, in_place: bool) -> nn.Linear:
    w = layer.weight
    merged = (w.to(torch.float32) + layer.delta_weight().to(device=w.device, dtype=torch.float32)).to(w.dtype)
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    if in_place:
        w.copy_(merged)
        lin.weight = w
        lin.bias = layer.bias
    else:
        lin.weight = nn.Parameter(merged, requires_grad=False)
        lin.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return lin


def merge_adapters(model: nn.Module, reversible: bool = False) -> nn.Module:
    """Replaces every adapter layer by an ``nn.Linear`` with weight ``W + s·B·diag(g)·A`` (shared A/B read
    per layer) and returns ``model``. ``reversible=True`` keeps the adapter layers aside (one copy of the
    targeted base weights) for :func:`unmerge_adapters`; otherwise W is overwritten in place."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapter layers to merge")
    stash = {}
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged in place already (LoRALinear.merge); unmerge it first")
        _replace(model, name, _merged_linear(layer, in_place=not reversible))
        if reversible:
            stash[name] = layer
    if reversible:
        # a plain attribute, not a submodule: the merged model's parameters/state_dict stay those of the base
        object.__setattr__(model, _STASH_ATTR, stash)
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is not None:
        cfg["merged"] = True
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undoes ``merge_adapters(model, reversible=True)`` bit-exactly (the original layers come back)."""
    stash = getattr(model, _STASH_ATTR, None)
    if not stash:
        raise ValueError("nothing to unmerge: call merge_adapters(model, reversible=True) first")
    for name, layer in stash.items():
        cur = model.get_submodule(name)
        layer.to(device=cur.weight.device)
        _replace(model, name, layer)
    object.__delattr__(model, _STASH_ATTR)
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is not None:
        cfg["merged"] = False
    return model
