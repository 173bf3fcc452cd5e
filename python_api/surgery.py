"""Model surgery, the one place that matches target names and replaces modules.

- :func:`matches` / :func:`lookup`: PEFT's rule for names — a list entry matches the full module name or its last
  dotted components; a single string is a regex on the full name.
- :func:`replace_modules`: swaps modules in one transaction — every replacement is built first; if anything fails
  the model is left exactly as it was (module types, ``requires_grad`` flags, state_dict) and a corrected retry
  works.
- :func:`iter_adapters`: every adapter layer (LoRA, ShareLoRA, MoE-LoRA) by name.

:func:`apply_adapters` puts :class:`LoRALinear` layers in place of the targeted ``nn.Linear`` layers (Hugging Face
models and plain ``nn.Module`` trees alike). Its :class:`~python_api.config.AdapterConfig` is recorded on the model
as ``model._lora_kernels_config`` (JSON-able) so a checkpoint rebuilds the same adapters, sharing included, with
:func:`apply_from_config`.

Merge choice: :func:`merge_adapters` *replaces* every adapter layer with a plain ``nn.Linear`` holding
``W + s·B_l·diag(g)·A`` (computed in fp32, rounded once to W's dtype). By default this is done in place on the base
weight (no copy, not reversible); a weight tied to another module (``lm_head`` ↔ ``wte``) is never written in
place: the merged layer gets its own copy, so the other module is unchanged. With ``reversible=True`` the adapter
layers are kept aside and :func:`unmerge_adapters` puts them back bit-exactly.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from lora_kernels import __version__

from .config import AdapterConfig
from .layers import LoRALinear
from .share import SHARE_MODES, SharedLoRALinear, ShareGroup, group_key

CONFIG_ATTR = "_lora_kernels_config"
_STASH_ATTR = "_lora_kernels_unmerged"


# ---- names -----------------------------------------------------------------------------------------------------
def matches(name: str, keys: Iterable[str] | str) -> bool:
    """PEFT's rule: a str is a regex on the full name; a list matches the full name or its last components."""
    if isinstance(keys, str):
        return re.fullmatch(keys, name) is not None
    return any(name == k or name.endswith("." + k) for k in keys)


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """Block index parsed from a module name (``encoder.layer.3.attention...`` → 3), or None outside blocks."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def block_stack(name: str) -> str | None:
    """The numbered-block list a module lies in (``model.decoder.layers.3.fc1`` → ``model.decoder.layers``), or
    None outside blocks."""
    m = _LAYER_RE.search(name)
    return None if m is None else name[:m.start(1) - 1].lstrip(".")


def check_one_stack(names, what: str) -> None:
    """Refuses module names in more than one stack of numbered blocks (an encoder-decoder's ``encoder.layers`` and
    ``decoder.layers``): what is allocated per block index would merge block i of each stack."""
    stacks = sorted({s for s in map(block_stack, names) if s is not None})
    if len(stacks) > 1:
        raise ValueError(f"{what}: the targets lie in {len(stacks)} stacks of numbered blocks {stacks}; experts and "
                         "layer alphas are allocated per block index, which would merge block i of every stack: "
                         f"target one stack per call (e.g. the regex r'{re.escape(stacks[0])}\\..*')")


def lookup(name: str, pattern: dict | None, default):
    """The value of the most specific key of ``pattern`` that :func:`matches` ``name``: the name itself, else the
    longest matching suffix (``{"fc": 2, "z.fc": 4}`` gives ``z.fc`` 4 whatever the keys' order), else default."""
    hits = [k for k in (pattern or {}) if matches(name, [k])]
    return pattern[max(hits, key=len)] if hits else default


def find_modules(model: nn.Module, keys: Iterable[str] | str, what: str = "target_modules",
                 kind: type = nn.Linear) -> list[str]:
    """Names of the ``kind`` modules of ``model`` that :func:`matches` ``keys``; a matched leaf of another type is
    refused (TypeError naming it); no match at all is a ValueError listing some candidates."""
    names, aliases, dead = [], {}, []
    for name, mod in model.named_modules(remove_duplicate=False):
        if name:
            aliases.setdefault(id(mod), []).append(name)
    for name, mod in model.named_modules():
        if not name or not any(matches(n, keys) for n in aliases[id(mod)]):
            continue
        if len(aliases[id(mod)]) > 1 and kind is nn.Linear and isinstance(mod, nn.Linear):
            # one module object at two places: a replacement under one name would leave the other place unadapted
            raise ValueError(f"module {name!r} is one module registered under {len(aliases[id(mod)])} names "
                             f"{aliases[id(mod)][:4]}: an adapter would replace it at one place only. Give each "
                             "place its own module before applying adapters")
        if isinstance(mod, LoRALinear) or type(mod).__name__ == "MoELoRALinear":
            raise ValueError(f"module {name!r} is already a {type(mod).__name__}: adapters were applied twice")
        if type(mod).__name__ == "Conv1D":
            raise TypeError(f"module {name!r} is a GPT-2 style Conv1D (weight stored [in, out]); adapters wrap "
                            "nn.Linear only. Target a model with nn.Linear projections, or convert the Conv1D to "
                            "nn.Linear (transpose its weight) before applying adapters")
        if kind is nn.Linear and isinstance(mod, nn.Linear):
            why = linear_problem(mod)
            if why == "mha":
                dead.append(name)
                continue
            if why is not None:
                raise TypeError(f"module {name!r} is a {type(mod).__name__}, an nn.Linear subclass whose forward is "
                                f"not x·Wᵀ + b ({why}): an adapter layer would replace that forward; leave it out of "
                                "target_modules")
        if isinstance(mod, kind):
            names.append(name)
        elif not list(mod.children()):
            raise TypeError(f"module {name!r} matches {what} but is a {type(mod).__name__}, not an "
                                f"{'nn.Linear' if kind is nn.Linear else kind.__name__}")
    if dead:
        warnings.warn(f"{what}: left out {dead[:4]}{' ...' if len(dead) > 4 else ''}: the out_proj of an "
                      "nn.MultiheadAttention, which reads its weight directly and never calls its forward, so an "
                      "adapter there would never run", RuntimeWarning, stacklevel=3)
    if not names:
        some = [n for n, m in model.named_modules() if isinstance(m, kind)][:8]
        what_kind = "nn.Linear" if kind is nn.Linear else "module"
        raise ValueError(f"{what}={keys!r} matches no {what_kind}; some of this model's: {some}")
    return names


_MHA_OUT_PROJ = getattr(nn.modules.linear, "NonDynamicallyQuantizableLinear", None)


def linear_problem(mod: nn.Linear) -> str | None:
    """Why an ``nn.Linear`` (subclass) cannot take an adapter, or None. An adapter layer replaces the module and
    computes ``x·Wᵀ + b`` plus the adapter, so: ``"mha"`` for an nn.MultiheadAttention's out_proj, whose forward is
    never called (the attention reads its weight itself: the adapter would never run); a reason for a subclass whose
    own forward is not ``x·Wᵀ + b`` (quantized or scaled linears), checked on two random rows (one small matmul).
    A subclass that keeps nn.Linear's forward, or whose forward computes the same (Falcon's FalconLinear), is fine;
    so is one on the meta device, which cannot be checked."""
    if type(mod) is nn.Linear:
        return None
    if _MHA_OUT_PROJ is not None and isinstance(mod, _MHA_OUT_PROJ):
        return "mha"
    if type(mod).forward is nn.Linear.forward or mod.weight.is_meta:
        return None
    extra = sorted(set(mod._parameters) - {"weight", "bias"}) + sorted(mod._buffers) + sorted(mod._modules)
    if extra:   # state the forward may use (a scale, a gate, a fake-quantizer): lost when the module is replaced
        return f"it holds {extra[:3]} besides weight and bias"
    w, b = mod.weight, mod.bias
    if not w.is_floating_point():
        return f"its weight is {w.dtype}"
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, mod.in_features, generator=gen, device="cpu").to(device=w.device, dtype=w.dtype)
    tol = 1e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-4
    try:
        # the class's forward itself (the module's hooks must not see the probe), in the weight's own dtype, and
        # leaving the global RNG where it was
        with torch.no_grad(), torch.random.fork_rng(devices=[]), torch.autocast(w.device.type, enabled=False):
            y, ref = type(mod).forward(mod, x), nn.functional.linear(x, w, b)
        scale = float(ref.float().nan_to_num(0, 0, 0).abs().max().clamp_min(1))   # a NaN weight: atol stays finite
        ok = isinstance(y, torch.Tensor) and y.shape == ref.shape and torch.allclose(
            y.float(), ref.float(), rtol=tol, atol=tol * scale, equal_nan=True)
    except Exception as e:   # noqa: BLE001 - any failure of the probe means the forward is not plain
        return f"its forward failed on a [2, {mod.in_features}] input: {type(e).__name__}"
    return None if ok else "its forward gives other values"


def exact_targets(names: Iterable[str]) -> str:
    """A ``target_modules`` regex matching exactly these full module names (a list of names would also match any
    module whose name ends with one of them: ``fc`` would match ``block.fc``)."""
    return "(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")"


# ---- one transactional replace ---------------------------------------------------------------------------------
def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def replace_modules(model: nn.Module, names: Iterable[str], build: Callable[[str, nn.Module], nn.Module | None],
                    after: Callable[[], None] | None = None, freeze: bool = False) -> dict[str, nn.Module]:
    """Replaces each named module by ``build(name, old)`` (None keeps it), all or nothing.

    ``freeze`` freezes every parameter of the model first. ``after`` runs once the new modules are in place (e.g.
    marking a head trainable); if ``build``, the swap or ``after`` raises, every module and every ``requires_grad``
    flag is put back before the error propagates. Returns ``{name: new module}``.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    swapped: list[tuple[str, nn.Module]] = []
    try:
        for p, _ in flags if freeze else ():
            p.requires_grad_(False)
        built = {}
        for name in names:
            new = build(name, model.get_submodule(name))
            if new is not None:
                built[name] = new
        for name, new in built.items():
            old = model.get_submodule(name)
            _set_child(model, name, new)
            swapped.append((name, old))
        if after is not None:
            after()
        return built
    except BaseException:
        for name, old in reversed(swapped):
            _set_child(model, name, old)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def iter_adapters(model: nn.Module, kinds: tuple[type, ...] | None = None) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for every adapter layer of ``model`` in module order (LoRA and ShareLoRA layers, and
    MoE-LoRA layers unless ``kinds`` narrows it)."""
    if kinds is None:
        from .moe import MoELoRALinear
        kinds = (LoRALinear, MoELoRALinear)
    for name, mod in model.named_modules():
        if isinstance(mod, kinds):
            yield name, mod


def adapter_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA / ShareLoRA layer of ``model`` by module name, in module order."""
    return dict(iter_adapters(model, (LoRALinear,)))


# ---- apply ---------------------------------------------------------------------------------------------------
def refuse_adapted(model: nn.Module, caller: str) -> None:
    """A second apply call would freeze the first call's adapters (every parameter is frozen first) and overwrite
    the recorded config, so its checkpoint would save but not load: refused."""
    if getattr(model, _STASH_ATTR, None):
        raise ValueError(f"{caller}: the model has adapters merged reversibly (merge_adapters(reversible=True)); "
                         "unmerge_adapters would put them back over any adapter applied now: unmerge_adapters(model) "
                         "first, or merge with reversible=False to build on the merged weights")
    present = [n for n, _ in iter_adapters(model)]
    if present:
        raise ValueError(f"{caller}: the model already has {len(present)} adapter layer(s) ({present[:3]}...); give "
                         "every target to one call (LoRA and MoE-LoRA layers cannot be combined in one model), or "
                         "merge_adapters / remove the adapters first")


def check_save_overlap(save: list[str], targets: list[str], model: nn.Module) -> None:
    """``modules_to_save`` that are (or contain) adapter targets, or hold a parameter tied to one (``lm_head.weight``
    is ``embed.weight``), would unfreeze the adapted base weights."""
    overlap = [s for s in save if any(n == s or n.startswith(s + ".") for n in targets)]
    if overlap:
        raise ValueError(f"modules_to_save {overlap} are (or contain) adapter targets: training them in full would "
                         "unfreeze the adapted base weights; leave them out of modules_to_save")
    base = {}
    for n in targets:
        for pn, p in model.get_submodule(n).named_parameters(recurse=False):
            base[id(p)] = f"{n}.{pn}"
    for s_name in save:
        for pn, p in model.get_submodule(s_name).named_parameters():
            if id(p) in base:
                raise ValueError(f"modules_to_save {s_name!r}: its parameter {pn!r} is the same tensor as the adapter "
                                 f"target's {base[id(p)]!r} (tied weights); training it in full would unfreeze that "
                                 "base weight: leave it out of modules_to_save, or untie the weights")


def _config_of(config, overrides: dict) -> AdapterConfig:
    if isinstance(config, AdapterConfig):
        return config.replace(**overrides) if overrides else config.validate()
    if isinstance(config, dict):
        return AdapterConfig.from_dict({**config, **overrides})
    if config is None:
        if "target_modules" not in overrides:
            raise TypeError("apply_adapters needs target_modules (or an AdapterConfig)")
        return AdapterConfig(**_checked(overrides))
    return AdapterConfig(**_checked({"target_modules": config, **overrides}))   # (model, ["query", "value"], r=8)


def _checked(kwargs: dict) -> dict:
    names = set(AdapterConfig.__dataclass_fields__)
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"unknown adapter option(s) {unknown}; the options are {sorted(names)}")
    return kwargs


def apply_adapters(model: nn.Module, config: AdapterConfig | Iterable[str] | str | dict | None = None,
                   **overrides) -> nn.Module:
    """Replaces the targeted ``nn.Linear`` layers of ``model`` by LoRA layers, in place, and returns ``model``.

    ``config`` is an :class:`~python_api.config.AdapterConfig` (or its dict), or — the short form — the
    ``target_modules`` themselves; keyword ``overrides`` set or change any option:
    ``apply_adapters(model, ["query", "value"], r=8, alpha=16)`` or ``apply_adapters(model, cfg, r=4)``.
    Every base parameter is frozen. GPT-2 ``Conv1D`` layers are refused (TypeError). All or nothing: on any error
    the model is left exactly as before.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    cfg = _config_of(config, overrides)
    names = find_modules(model, cfg.target_modules)
    for key, what in ((cfg.rank_pattern, "rank_pattern"), (cfg.alpha_pattern, "alpha_pattern"),
                      (cfg.rank_masks, "rank_masks")):
        stray = [k for k in key if not any(matches(n, [k]) for n in names)]
        if stray:
            raise ValueError(f"{what} keys {stray} match none of the adapted modules ({names[:6]}...)")
    refuse_adapted(model, "apply_adapters")
    save = find_modules(model, cfg.modules_to_save, "modules_to_save", nn.Module) if cfg.modules_to_save else []
    check_save_overlap(save, names, model)
    shared = SHARE_MODES[cfg.share]
    keys = {n: group_key(n, cfg.share_scope, cfg.attention_names) for n in names}
    groups: dict[str, ShareGroup] = {}
    owners: dict[str, tuple[str, LoRALinear]] = {}   # group id -> (first module, its layer)

    def build(name: str, base: nn.Module) -> LoRALinear:
        rank = int(lookup(name, cfg.rank_pattern, cfg.r))
        mine = {}
        for pname in shared:
            gid = f"{keys[name]}.{pname}"
            if gid in owners:
                owner_name, owner = owners[gid]
                want = (rank, base.in_features) if pname == "lora_A" else (base.out_features, rank)
                have = tuple(getattr(owner, pname).shape)
                if have != want:
                    raise ValueError(f"cannot share {pname} of {name!r} with {owner_name!r}: shapes {want} vs {have} "
                                     f"(share_scope={cfg.share_scope!r}, r={rank}); use another scope or rank")
                mine[pname] = getattr(owner, pname)
        cls = SharedLoRALinear if shared else LoRALinear
        try:
            alpha = lookup(name, cfg.alpha_pattern, cfg.alpha)
            layer = cls.from_linear(base, rank, alpha, cfg.dropout, svd=cfg.svd, lora_A=mine.get("lora_A"),
                                    lora_B=mine.get("lora_B"), adapter_dtype=cfg.adapter_dtype, svd_init=cfg.svd_init)
            mask = lookup(name, cfg.rank_masks, None)
            if mask is not None:
                layer.set_rank_mask(mask)
        except (TypeError, ValueError) as e:
            raise type(e)(f"module {name!r}: {e}") from None
        layer.train(base.training)   # an eval-mode model gets eval-mode adapters (no dropout)
        if shared:
            grp = {}
            for pname in shared:
                gid = f"{keys[name]}.{pname}"
                if gid not in owners:
                    owners[gid] = (name, layer)
                    groups[gid] = ShareGroup(gid, pname, multi_type=keys[name] != group_key(name, "module_type"))
                groups[gid].modules.append(name)
                grp[pname] = groups[gid]
            layer.configure_sharing(grp.get("lora_A"), grp.get("lora_B"), cfg.accumulate, cfg.reuse_shrink)
        return layer

    def unfreeze_heads():
        for n in save:
            for p in model.get_submodule(n).parameters():
                p.requires_grad_(True)

    replace_modules(model, names, build, after=unfreeze_heads, freeze=True)
    setattr(model, CONFIG_ATTR, {
        **cfg.to_dict(),
        "method": "sharelora" if cfg.share else ("svd_lora" if cfg.svd else "lora"),
        "version": __version__,
        "adapted_modules": names,
        # shared matrix id -> the modules holding that one Parameter (the first one owns it in checkpoints)
        "sharing": {gid: list(g.modules) for gid, g in groups.items()},
    })
    return model


_RECORD_ONLY = ("method", "version", "adapted_modules", "sharing", "merged")


def config_from_record(record: dict) -> AdapterConfig:
    """The :class:`AdapterConfig` inside a recorded ``_lora_kernels_config`` (a checkpoint's ``config``)."""
    opts = {k: v for k, v in record.items() if k not in _RECORD_ONLY}
    opts.pop("rank_masks", None)   # masks are restored from the checkpoint's tensors
    return AdapterConfig.from_dict(opts)


def apply_from_config(model: nn.Module, record: dict) -> nn.Module:
    """Replays :func:`apply_adapters` from a recorded ``_lora_kernels_config`` (checkpoint loading) and checks
    that the sharing map comes out identical."""
    apply_adapters(model, config_from_record(record))
    got = getattr(model, CONFIG_ATTR)["sharing"]
    if "sharing" in record and got != record["sharing"]:
        raise ValueError(f"rebuilt sharing map {got} differs from the recorded one {record['sharing']}")
    return model


# ---- counting, state ---------------------------------------------------------------------------------------------
def count_trainable(model: nn.Module, adapters_only: bool = False) -> int:
    """Number of trainable scalars that take part in the model, each Parameter counted once however many layers
    share it. Masked-off ranks of a fixed rank mask are not counted (their rows of A and columns of B never train:
    the op runs on the active ranks only). ``adapters_only`` leaves out a trainable head."""
    inactive = 0
    for _, layer in iter_adapters(model, (LoRALinear,)):
        off = 0 if layer.rank_mask.is_meta else layer.r - layer.active_rank
        for p, size in ((layer.lora_A, layer.in_features), (layer.lora_B, layer.out_features), (layer.lora_E, 1)):
            if off and p is not None and p.requires_grad and not _is_shared(layer, p):
                inactive += off * size
    if adapters_only:
        seen = {id(p): p for _, m in iter_adapters(model) for p in m.parameters() if p.requires_grad}
        return sum(p.numel() for p in seen.values()) - inactive
    return sum(p.numel() for p in model.parameters() if p.requires_grad) - inactive   # parameters() yields each once


def _is_shared(layer: LoRALinear, p: torch.Tensor) -> bool:
    # A shared matrix serves other layers' active ranks too: its masked rows are not unused.
    return (getattr(layer, "share_a", None) is not None and p is layer.lora_A) or \
           (getattr(layer, "share_b", None) is not None and p is layer.lora_B)


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
    :func:`adapter_state_dict` output (each shared matrix once) or a full ``state_dict`` (every alias). All or
    nothing: every entry is checked (presence, shape, shared copies equal, finite values, no unexpected key with
    ``strict``) before any tensor is written."""
    aliases: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, layer in adapter_layers(model).items():
        for pname in ("lora_A", "lora_B", "lora_E", "rank_mask"):
            t = getattr(layer, pname, None)
            if t is not None:
                aliases.setdefault(id(t), (t, []))[1].append(f"{name}.{pname}")
    for pname, p in model.named_parameters():
        if p.requires_grad and id(p) not in aliases:
            aliases[id(p)] = (p, [pname])
    used, plan = set(), []
    for t, keys in aliases.values():   # every check first: nothing is copied unless the whole state fits
        present = [k for k in keys if k in state]
        if not present:
            if strict:
                raise KeyError(f"checkpoint has no entry for {keys[0]!r} (shared by {len(keys)} modules)")
            continue
        src = state[present[0]]
        if not isinstance(src, torch.Tensor):
            raise TypeError(f"{present[0]!r}: expected a tensor, got {type(src).__name__}")
        for k in present[1:]:
            if not torch.equal(state[k], src):
                raise ValueError(f"{k!r} and {present[0]!r} hold one shared matrix but differ in the checkpoint")
        if tuple(src.shape) != tuple(t.shape):
            raise ValueError(f"{present[0]!r}: checkpoint shape {tuple(src.shape)} != model shape {tuple(t.shape)}")
        if src.is_floating_point() and not bool(torch.isfinite(src).all()):
            raise ValueError(f"{present[0]!r}: the checkpoint holds non-finite values (NaN or Inf)")
        plan.append((t, src))
        used.update(present)
    if strict:
        extra = [k for k in state if k not in used]
        if extra:
            raise KeyError(f"unexpected keys in adapter checkpoint: {extra[:8]}")
    for t, src in plan:
        t.copy_(src)


# ---- merge -----------------------------------------------------------------------------------------------------
def tied_elsewhere(model: nn.Module, param: torch.Tensor, owner: str) -> list[str]:
    """Names of parameters of ``model``, outside module ``owner``, that are the same tensor as ``param``
    (or share its storage): a tied weight such as GPT-2's ``lm_head.weight`` ↔ ``transformer.wte.weight``."""
    out = []
    for n, p in model.named_parameters(remove_duplicate=False):
        if n.rpartition(".")[0] == owner:
            continue
        if p is param or (p.untyped_storage().data_ptr() == param.untyped_storage().data_ptr() and p.numel()):
            out.append(n)
    return out


@torch.no_grad()
def _merged_linear(layer: LoRALinear, in_place: bool) -> nn.Linear:
    w = layer.weight
    cd = torch.promote_types(w.dtype, torch.float32)   # fp64 weights merge in fp64, half ones in fp32
    merged = (w.to(cd) + layer.delta_weight().to(device=w.device, dtype=cd)).to(w.dtype)
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    if in_place:
        w.copy_(merged)
        lin.weight = w
        lin.bias = layer.bias
    else:
        lin.weight = nn.Parameter(merged, requires_grad=False)
        lin.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return lin.train(layer.training)


def merge_adapters(model: nn.Module, reversible: bool = False) -> nn.Module:
    """Replaces every adapter layer by an ``nn.Linear`` with weight ``W + s·B·diag(g)·A`` (shared A/B read per
    layer) and returns ``model``. ``reversible=True`` keeps the adapter layers aside (one copy of the targeted
    base weights) for :func:`unmerge_adapters`; otherwise W is overwritten in place — except a weight tied to
    another module, which gets a merged copy so the other module keeps its weight. A layer with a per-token gate
    set (MoE routing, coalitions) has no single merged weight: refused. So is a non-finite adapter delta, before
    any layer is touched: the model is merged whole or not at all."""
    layers = adapter_layers(model)
    if not layers:
        if any(type(m).__name__ == "MoELoRALinear" for m in model.modules()):
            raise ValueError("merge_adapters: MoE-LoRA layers have no merged form (the router picks experts per "
                             "token); keep the model unmerged")
        raise ValueError("model has no adapter layers to merge")
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"layer {name!r} is merged in place already (LoRALinear.merge); unmerge it first")
        if layer._token_gate is not None:
            raise ValueError(f"layer {name!r} has a per-token gate set: a merged weight cannot express it; call "
                             "set_token_gate(None) first")
    # every delta is checked before any weight is written: an in-place merge cannot be undone, so a NaN/Inf
    # adapter found half-way would leave the model half merged with poisoned base weights. The delta is computed
    # again when merging: a second small matmul per layer in a one-off call, instead of holding every merged copy
    with torch.no_grad():
        for name, layer in layers.items():
            if not bool(torch.isfinite(layer.delta_weight()).all()):
                raise ValueError(f"layer {name!r}: its adapter delta B·diag(g)·A has NaN/Inf values; nothing was "
                                 "merged (reload the adapters from a checkpoint taken before the divergence)")
    tied = {n: bool(tied_elsewhere(model, layer.weight, n)) for n, layer in layers.items()}
    replace_modules(model, list(layers),
                    lambda n, layer: _merged_linear(layer, in_place=not reversible and not tied[n]))
    if reversible:
        # a plain attribute, not a submodule: the merged model's parameters/state_dict stay those of the base
        object.__setattr__(model, _STASH_ATTR, layers)
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
        # the stash is outside the module tree: a .to() / .half() of the merged model never reached it. Only such a
        # cast is repeated here (a bf16 base keeps fp32 adapters: they are not cast to the base's dtype)
        layer.to(device=cur.weight.device)
        if layer.weight.dtype != cur.weight.dtype:
            layer.to(dtype=cur.weight.dtype)
        layer.train(cur.training)   # the mode the model is in now, not the one it had when merged
        _set_child(model, name, layer)
    object.__delattr__(model, _STASH_ATTR)
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is not None:
        cfg["merged"] = False
    return model
