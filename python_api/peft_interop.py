"""PEFT interoperability: export this package's adapters as a PEFT LoRA adapter directory, import one back.

Export maps each :class:`LoRALinear` to a PEFT LoRA module with the same ΔW:
- a rank mask keeps only the active ranks (``A[active]``, ``B[:, active]``), so a ShapLoRA / AdaLoRA rank
  pattern becomes PEFT's ``rank_pattern`` (a module with no active rank is left out of ``target_modules``);
- SVD-form values are folded into B: ``B' = B · diag(E)``;
- PEFT scales by ``lora_alpha / r_module``; this package by ``alpha / r_init``: ``alpha_pattern`` is set to
  ``s · r_module`` so the scale is unchanged;
- shared matrices (ShareLoRA) are written once per module (PEFT has no sharing): equal outputs, more bytes.
MoE-LoRA layers have no PEFT LoRA equivalent and are refused.
Patterns use each module's full name, regex-escaped (PEFT matches them as ``(.*\\.)?<key>$``).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import torch
from torch import nn

from .layers import LoRALinear

PEFT_PREFIX = "base_model.model."
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def _adapter_layers(model: nn.Module) -> dict[str, LoRALinear]:
    from .moe import MoELoRALinear
    from .surgery import adapter_layers, iter_adapters

    moe = [n for n, _ in iter_adapters(model, (MoELoRALinear,))]
    if moe:
        raise ValueError(f"MoE-LoRA layers ({moe[:3]}...) have no PEFT LoRA equivalent; export refused")
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no LoRALinear adapter layers to export")
    return layers


@torch.no_grad()
def export_peft(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None,
                task_type: str | None = None) -> str:
    """Writes a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) that
    ``peft.PeftModel.from_pretrained(base_model, path)`` loads with the same outputs. Returns ``path``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    layers = _adapter_layers(model)
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"layers {merged[:3]} are merged: unmerge before exporting")
    dropouts = {m.dropout for m in layers.values()}
    if len(dropouts) > 1:
        raise ValueError(f"PEFT has one lora_dropout per adapter; the layers use {sorted(dropouts)}")
    tensors, ranks, alphas = {}, {}, {}
    for name, m in layers.items():
        active = m.rank_mask.nonzero().flatten()
        if active.numel() == 0:
            continue
        a = m.lora_A.detach()[active]                                   # [k, K]
        b = m.lora_B.detach()[:, active]                                # [N, k]
        if m.svd:
            b = b * m.lora_E.detach()[active].to(b.dtype)
        k = int(active.numel())
        ranks[name], alphas[name] = k, m.scaling * k
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous().clone()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous().clone()
    if not ranks:
        raise ValueError("every adapter layer has rank 0 (all ranks masked): nothing to export")
    adapted = {id(p) for m in layers.values() for p in m.parameters()}
    saved_modules = _modules_to_save(model, adapted)
    # a trained parameter neither in an adapter nor in a whole trainable module (a bias tuned beside the adapters,
    # one unfrozen LayerNorm weight) has no place in a PEFT LoRA adapter: refused rather than left out silently
    saved = {id(p) for n in saved_modules for p in model.get_submodule(n).parameters()}
    lora = {id(p) for m in layers.values() for p in (m.lora_A, m.lora_B, m.lora_E) if p is not None}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora | saved]
    if stray:
        raise ValueError(f"trainable parameters outside the adapters and outside whole trainable modules "
                         f"{stray[:4]}{' ...' if len(stray) > 4 else ''} cannot be exported to a PEFT LoRA adapter "
                         "(it would reload without them): freeze them, or save with save_adapters")
    for mod_name in saved_modules:
        for pname, p in model.get_submodule(mod_name).named_parameters():
            tensors[f"{PEFT_PREFIX}{mod_name}.{pname}"] = p.detach().contiguous().clone()
    r = max(ranks.values())
    targets, key = peft_names(ranks, [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or n in layers])
    cfg = LoraConfig(r=r, lora_alpha=alphas[max(ranks, key=ranks.get)], target_modules=targets,
                     rank_pattern={key(n): k for n, k in ranks.items()},
                     alpha_pattern={key(n): v for n, v in alphas.items()},
                     lora_dropout=dropouts.pop(), bias="none", modules_to_save=saved_modules or None,
                     base_model_name_or_path=base_model_name_or_path, task_type=task_type, inference_mode=True)
    os.makedirs(path, exist_ok=True)
    cfg.save_pretrained(str(path))
    save_file(tensors, os.path.join(path, PEFT_WEIGHTS), metadata={"format": "pt"})
    return str(path)


def peft_names(names, others=()) -> tuple[list[str] | str, Callable[[str], str]]:
    """PEFT's ``target_modules`` for exactly the modules ``names`` (full names), and the ``rank_pattern`` /
    ``alpha_pattern`` key of each. PEFT matches a target or a key as a suffix of the module name, first key in
    sorted order: a name that is the suffix of another module's (``fc`` and ``z.fc``, among ``names`` or the
    model's ``others``) gets a key anchored to the whole name, or its rank would be taken for the other one, and the
    targets become one full-name regex, so no other ``*.fc`` is adapted either. Otherwise the plain name list."""
    names = sorted(names)
    every = set(names) | set(others)
    clash = {n for n in names if any(o != n and o.endswith("." + n) for o in every)}

    def key(n: str) -> str:
        return ("^" if n in clash else "") + re.escape(n)
    targets = ("(?:" + "|".join(re.escape(n) for n in names) + ")") if clash else names
    return targets, key


def _modules_to_save(model: nn.Module, adapted: set[int]) -> list[str]:
    """Top-most modules whose parameters are all trainable and none belongs to an adapter (a task head)."""
    out = []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(o + ".") for o in out):
            continue
        ps = list(mod.parameters())
        if ps and all(p.requires_grad and id(p) not in adapted for p in ps):
            out.append(name)
    return out


@torch.no_grad()
def import_peft(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Puts a PEFT LoRA adapter (directory written by ``PeftModel.save_pretrained``) into ``model``'s Linears
    as this package's :class:`LoRALinear` layers (and copies its modules_to_save). Returns ``model``.
    Everything is checked against the model before it is modified."""
    from safetensors.torch import load_file

    from .surgery import adapter_layers, apply_adapters, exact_targets

    cfg_path, w_path = os.path.join(path, PEFT_CONFIG), os.path.join(path, PEFT_WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found: not a PEFT adapter directory (safetensors weights expected)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"only PEFT LoRA adapters can be imported, got peft_type={cfg.get('peft_type')!r}")
    for key in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if cfg.get(key):
            raise ValueError(f"PEFT option {key}=True has no equivalent here; import refused")
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(("pissa", "olora", "corda", "loftq")):
        # these inits move the principal part out of the base weight (W - sBA), which PEFT redoes on load: the
        # adapter alone, added to the unmodified W, would count that part twice
        raise ValueError(f"PEFT init_lora_weights={cfg.get('init_lora_weights')!r} changes the base weight; "
                         "import refused. Convert the adapter to plain LoRA with PEFT first "
                         "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"PEFT bias={cfg.get('bias')!r} (trained biases of the base layers) has no equivalent "
                         "here; import refused")
    state = load_file(w_path)
    lora, extra = {}, {}
    for k, v in state.items():
        if not k.startswith(PEFT_PREFIX):
            raise ValueError(f"unexpected key {k!r} in {w_path} (expected the prefix {PEFT_PREFIX!r})")
        k = k[len(PEFT_PREFIX):]
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", k)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = v
        elif "lora_" in k:
            raise ValueError(f"unsupported PEFT LoRA tensor {k!r} (embedding / convolution adapters are not handled)")
        else:
            extra[k.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")] = v
    mods = dict(model.named_modules())
    problems = []
    for name, t in lora.items():
        lin = mods.get(name)
        if set(t) != {"lora_A", "lora_B"}:
            problems.append(f"{name}: has {sorted(t)}, needs lora_A and lora_B")
        elif not isinstance(lin, nn.Linear):
            problems.append(f"{name}: {'no such module' if lin is None else type(lin).__name__ + ', not nn.Linear'}")
        elif (t["lora_A"].shape[1], t["lora_B"].shape[0]) != (lin.in_features, lin.out_features) \
                or t["lora_A"].shape[0] != t["lora_B"].shape[1]:
            problems.append(f"{name}: A {tuple(t['lora_A'].shape)}, B {tuple(t['lora_B'].shape)} do not fit "
                            f"[in={lin.in_features}, out={lin.out_features}]")
    params = dict(model.named_parameters())
    for k, v in extra.items():
        if k not in params:
            problems.append(f"{k}: no such parameter")
        elif params[k].shape != v.shape:
            problems.append(f"{k}: shape {tuple(v.shape)} vs model {tuple(params[k].shape)}")
    if not lora:
        problems.append("no lora_A / lora_B tensors in the adapter")
    if problems:
        raise ValueError("PEFT adapter does not fit this model: " + "; ".join(problems[:6]))
    ranks = {n: int(t["lora_A"].shape[0]) for n, t in lora.items()}
    rs_lora = bool(cfg.get("use_rslora"))
    alpha_pattern = cfg.get("alpha_pattern") or {}

    def scale(name):
        alpha = _pattern_value(alpha_pattern, name, cfg.get("lora_alpha", 8))
        return alpha / (ranks[name] ** 0.5 if rs_lora else ranks[name])

    heads = sorted({k.rsplit(".", 1)[0] for k in extra})
    # the adapter's modules exactly (a full-name regex): the name list form would also adapt every other module
    # ending in one of the names ("fc" matches "y.fc")
    apply_adapters(model, exact_targets(lora), r=max(ranks.values()),
                   alpha=float(cfg.get("lora_alpha", 8)), dropout=float(cfg.get("lora_dropout", 0.0)),
                   rank_pattern=ranks, alpha_pattern={n: scale(n) * k for n, k in ranks.items()},
                   modules_to_save=heads or None)
    for name, layer in adapter_layers(model).items():
        layer.lora_A.copy_(lora[name]["lora_A"])
        layer.lora_B.copy_(lora[name]["lora_B"])
        layer.scaling = scale(name)
        layer.lora_alpha = layer.scaling * layer.r
    for k, v in extra.items():
        params[k].copy_(v)
    cfg_rec = getattr(model, "_lora_kernels_config", None)
    if cfg_rec is not None:
        cfg_rec["imported_from_peft"] = {"path": str(path), "scaling": {n: scale(n) for n in lora}}
    return model


def _pattern_value(pattern: dict, name: str, default):
    for key, v in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return v
    return default
