"""Lossless adapter checkpoints: one safetensors file of tensors plus one JSON config, in a directory.

``adapter_config.json`` holds the format tag, package version, the adaptation recorded by model surgery
(method, target modules, r / alpha, rank pattern, sharing map, modules to save), each adapted module's
class and shapes (experts and top-k for MoE-LoRA layers), a fingerprint of each base weight, the
allocator's class, step and non-tensor state, RNG seeds and the list of tensor keys.
``adapter_model.safetensors`` holds the adapter tensors (A, B, E, rank masks, routers, trainable heads),
each shared matrix ONCE under its first module, the allocator's tensors under ``__allocator__/`` and the
torch RNG state under ``__rng__/torch``.

Loading validates everything (module names, base shapes, tensor keys and shapes, allocator) before any
tensor is written; if rebuilding adapters on a bare base model fails validation the swapped modules are
put back, so a refused checkpoint leaves the model as it was.
"""
from __future__ import annotations

import json
import os
import random
import warnings
from typing import Any

import torch
from torch import nn

from lora_kernels import __version__

from .layers import LoRALinear

FORMAT = "lora_kernels.adapter"
CONFIG_FILE = "adapter_config.json"
TENSOR_FILE = "adapter_model.safetensors"
_ALLOC = "__allocator__/"
_RNG = "__rng__/torch"
_CONFIG_ATTR = "_lora_kernels_config"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (names, shapes, keys) or is not a lora-kernels checkpoint."""


# ---- what an adapted model holds -----------------------------------------------------------------------
def _moe_cls():
    from .moe import MoELoRALinear
    return MoELoRALinear


def _adapted(model: nn.Module) -> dict[str, nn.Module]:
    from .surgery import iter_adapters
    return dict(iter_adapters(model))


def _fingerprint(w: torch.Tensor) -> list[float]:
    w = w.detach().to(torch.float64)
    return [float(w.sum()), float((w * w).sum())]


def _module_specs(model: nn.Module) -> dict[str, dict]:
    moe = _moe_cls()
    out = {}
    for name, m in _adapted(model).items():
        spec = {"class": type(m).__name__, "in_features": m.in_features, "out_features": m.out_features,
                "r": m.r, "alpha": m.lora_alpha, "dropout": m.dropout, "bias": m.bias is not None,
                "base_fingerprint": _fingerprint(m.weight)}
        if isinstance(m, moe):
            spec.update(num_experts=m.num_experts, top_k=m.top_k, load_balance_coef=m.load_balance_coef)
        else:
            spec.update(svd=m.svd, merged=bool(m.merged))
        out[name] = spec
    return out


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint stores, each shared Parameter once (under its first name)."""
    from .surgery import adapter_state_dict

    out = dict(adapter_state_dict(model))
    seen = {id(t) for t in out.values()}
    for name, m in _adapted(model).items():
        if isinstance(m, LoRALinear):
            continue
        # MoE-LoRA: router and stacked experts, even when frozen (they define the adapted model)
        for pname, p in m.named_parameters(recurse=False):
            if pname in ("weight", "bias") or id(p) in seen:
                continue
            seen.add(id(p))
            out[f"{name}.{pname}"] = p
    # adapter_state_dict returns detached views: compare identities of the underlying parameters too
    return {k: v.detach() for k, v in out.items()}


def _live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> the model's own tensor (not a copy) for every key of :func:`_adapter_tensors`."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    out = {}
    for k in _adapter_tensors(model):
        t = params.get(k)
        if t is None:
            t = buffers.get(k)
        if t is None:
            mod, _, attr = k.rpartition(".")
            t = getattr(model.get_submodule(mod), attr)
        out[k] = t
    return out


# ---- nested allocator state <-> JSON + tensors ----------------------------------------------------------
def _pack(obj: Any, path: str, tensors: dict[str, torch.Tensor]):
    import numpy as np

    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, torch.Tensor):
        key = _ALLOC + path
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _pack(v, f"{path}/{k}", tensors) for k, v in obj.items()}}
        return {"__items__": [[_pack(k, f"{path}/k{i}", tensors), _pack(v, f"{path}/{i}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [_pack(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"allocator state holds a {type(obj).__name__} at {path!r}: cannot be stored")


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]].clone()
        if "__tuple__" in obj:
            return tuple(_unpack(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_hashable(_unpack(k, tensors)): _unpack(v, tensors) for k, v in obj["__items__"]}
        return {k: _unpack(v, tensors) for k, v in obj["__dict__"].items()}
    return obj


def _hashable(k):
    return tuple(k) if isinstance(k, list) else k


# ---- save -----------------------------------------------------------------------------------------------
def save_adapters(model: nn.Module, path: str | os.PathLike, *, allocator: Any = None, step: int | None = None,
                  seed: int | None = None, extra: dict | None = None) -> str:
    """Writes ``model``'s adapters to the directory ``path`` (created if needed) and returns it.

    Args:
        model: a model adapted by :func:`python_api.apply_adapters` (or MoE-LoRA surgery).
        allocator: optional object with ``state_dict()`` (SensitivityTracker, AdaLoRAAllocator, ...): its
            state is stored so a resumed run takes the same next allocation decision.
        step: the training step the checkpoint was taken at.
        seed: the run's seed (stored with the torch RNG state).
        extra: any JSON-able user metadata.
    """
    layers = _adapted(model)
    if not layers:
        raise ValueError("model has no adapter layers (apply_adapters first; a merged model has none left)")
    merged = [n for n, m in layers.items() if getattr(m, "merged", False)]
    if merged:
        raise ValueError(f"layers {merged[:4]} are merged in place: unmerge them before saving")
    tensors = {k: v.contiguous().clone() for k, v in _adapter_tensors(model).items()}
    cfg = dict(getattr(model, _CONFIG_ATTR, None) or {})
    moe = any(not isinstance(m, LoRALinear) for m in layers.values())
    if moe:
        cfg = {"method": "moe_lora", "version": __version__,
               **{k: v for k, v in cfg.items() if k in ("sharing", "modules_to_save")}}
    alloc_json = None
    if allocator is not None:
        if not hasattr(allocator, "state_dict"):
            raise TypeError(f"allocator must have state_dict(), got {type(allocator).__name__}")
        alloc_json = {"class": type(allocator).__name__, "state": _pack(allocator.state_dict(), "state", tensors)}
    tensors[_RNG] = torch.get_rng_state()
    meta = {
        "format": FORMAT, "version": __version__, "torch_version": torch.__version__,
        "adaptation": cfg, "modules": _module_specs(model),
        "allocator": alloc_json, "step": step,
        "seeds": {"seed": seed, "torch_initial_seed": int(torch.initial_seed()),
                  "python_random_state": _py_state()},
        "tensors": sorted(k for k in tensors if not k.startswith(("__allocator__/", "__rng__/"))),
        "extra": extra or {},
    }
    json.dumps(meta)  # fail before touching the disk if something is not JSON-able
    os.makedirs(path, exist_ok=True)
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(path, TENSOR_FILE), metadata={"format": FORMAT, "version": __version__})
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return str(path)


def _py_state():
    v, state, gauss = random.getstate()
    return [v, list(state), gauss]


# ---- load -----------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a checkpoint directory, after checking it is one."""
    cfg_path, t_path = os.path.join(path, CONFIG_FILE), os.path.join(path, TENSOR_FILE)
    for p in (cfg_path, t_path):
        if not os.path.exists(p):
            raise CheckpointError(f"{p} not found: {path} is not a lora-kernels adapter checkpoint")
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    from safetensors.torch import load_file

    return meta, load_file(t_path)


def _check_base(model: nn.Module, specs: dict[str, dict]) -> None:
    """Every recorded module must exist as an nn.Linear (or adapter) of the same shape."""
    mods = dict(model.named_modules())
    problems = []
    for name, s in specs.items():
        m = mods.get(name)
        if m is None:
            problems.append(f"{name}: no such module")
            continue
        if not isinstance(m, nn.Linear) and not hasattr(m, "in_features"):
            problems.append(f"{name}: is a {type(m).__name__}, not a linear layer")
            continue
        have, want = (m.in_features, m.out_features), (s["in_features"], s["out_features"])
        if have != want:
            problems.append(f"{name}: model is [in={have[0]}, out={have[1]}], checkpoint [in={want[0]}, out={want[1]}]")
    if problems:
        raise CheckpointError(f"checkpoint is for a different base model ({len(problems)} mismatches): "
                              + "; ".join(problems[:6]) + ("; ..." if len(problems) > 6 else ""))


def _rebuild(model: nn.Module, meta: dict) -> None:
    cfg, specs = meta["adaptation"], meta["modules"]
    if cfg.get("method") == "moe_lora":
        from .surgery import find_modules, replace_modules
        moe = _moe_cls()
        heads = cfg.get("modules_to_save") or []
        save = find_modules(model, heads, "modules_to_save", nn.Module) if heads else []
        stored = set(meta.get("tensors", []))

        def unfreeze_heads():
            # stored non-adapter parameters (a task head) train again, as they did when saved
            for n in save:
                model.get_submodule(n).requires_grad_(True)
            for pname, p in model.named_parameters():
                if pname in stored:
                    p.requires_grad_(True)

        replace_modules(model, list(specs), lambda name, lin: moe.from_linear(
            lin, specs[name]["num_experts"], specs[name]["r"], specs[name]["alpha"], specs[name]["dropout"],
            specs[name]["top_k"], specs[name]["load_balance_coef"]), after=unfreeze_heads, freeze=True)
        setattr(model, _CONFIG_ATTR, dict(cfg))
    else:
        from .surgery import apply_from_config

        apply_from_config(model, cfg)


def _check_structure(model: nn.Module, meta: dict) -> None:
    have = _module_specs(model)
    want = meta["modules"]
    if set(have) != set(want):
        missing, unknown = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        raise CheckpointError(f"adapted modules differ: in the checkpoint only {missing[:6]}, "
                              f"in the model only {unknown[:6]}")
    keys = ("class", "r", "in_features", "out_features", "svd", "num_experts", "top_k")
    for name in want:
        diff = {k: (have[name].get(k), want[name].get(k)) for k in keys if have[name].get(k) != want[name].get(k)}
        if diff:
            raise CheckpointError(f"module {name!r} differs from the checkpoint (model, checkpoint): {diff}")
    cfg_model = getattr(model, _CONFIG_ATTR, None) or {}
    if meta["adaptation"].get("sharing", {}) != cfg_model.get("sharing", {}):
        raise CheckpointError(f"sharing map differs: checkpoint {meta['adaptation'].get('sharing')}, "
                              f"model {cfg_model.get('sharing')}")


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    live = _live_tensors(model)
    stored = {k: v for k, v in tensors.items() if not k.startswith(("__allocator__/", "__rng__/"))}
    missing, unknown = sorted(set(live) - set(stored)), sorted(set(stored) - set(live))
    if missing or unknown:
        raise CheckpointError(f"checkpoint keys do not match the model: missing {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}; unknown {unknown[:8]}"
                              f"{' ...' if len(unknown) > 8 else ''}")
    bad = [f"{k}: checkpoint {tuple(stored[k].shape)} vs model {tuple(t.shape)}"
           for k, t in live.items() if tuple(stored[k].shape) != tuple(t.shape)]
    if bad:
        raise CheckpointError("tensor shapes differ (checkpoint for a different base model or rank?): "
                              + "; ".join(bad[:6]))
    return live


def load_adapters(model: nn.Module, path: str | os.PathLike, *, allocator: Any = None,
                  restore_rng: bool = False) -> nn.Module:
    """Restores the adapters saved by :func:`save_adapters` into ``model`` and returns it.

    ``model`` is either the bare base model (the adapters are rebuilt from the recorded configuration) or a
    model adapted the same way. Nothing is written unless every check passes. ``allocator``: an object with
    ``load_state_dict`` that receives the stored allocator state. ``restore_rng``: also restore torch's
    global RNG state and Python's ``random`` state as they were at save time.
    """
    meta, tensors = read_checkpoint(path)
    if meta.get("version") != __version__:
        warnings.warn(f"checkpoint written by lora-kernels {meta.get('version')}, this is {__version__}", stacklevel=2)
    if allocator is not None:
        if meta.get("allocator") is None:
            raise CheckpointError(f"{path} stores no allocator state, but allocator= was given")
        if meta["allocator"]["class"] != type(allocator).__name__:
            raise CheckpointError(f"checkpoint stores {meta['allocator']['class']} state, allocator is "
                                  f"{type(allocator).__name__}")
    _check_base(model, meta["modules"])
    rebuilt = None
    if not _adapted(model):
        rebuilt = _snapshot(model, meta["modules"])
        try:
            _rebuild(model, meta)
        except Exception:
            _restore(model, rebuilt)
            raise
    try:
        _check_structure(model, meta)
        live = _check_tensors(model, tensors)
        alloc_state = None
        if allocator is not None:
            alloc_state = _unpack(meta["allocator"]["state"], tensors)
    except Exception:
        if rebuilt is not None:
            _restore(model, rebuilt)
        raise
    for name, s in meta["modules"].items():
        fp = _fingerprint(model.get_submodule(name).weight)
        if any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip(fp, s["base_fingerprint"])):
            warnings.warn(f"base weight of {name!r} differs from the one the adapters were trained on "
                          "(same shape, other values)", stacklevel=2)
            break
    with torch.no_grad():
        for k, t in live.items():
            t.copy_(tensors[k])
    if alloc_state is not None:
        allocator.load_state_dict(alloc_state)
    if restore_rng:
        torch.set_rng_state(tensors[_RNG])
        v, state, gauss = meta["seeds"]["python_random_state"]
        random.setstate((v, tuple(state), gauss))
    return model


def _snapshot(model: nn.Module, specs: dict) -> dict:
    return {"modules": {n: model.get_submodule(n) for n in specs},
            "grad": {id(p): p.requires_grad for p in model.parameters()},
            "config": getattr(model, _CONFIG_ATTR, None)}


def _restore(model: nn.Module, snap: dict) -> None:
    for name, mod in snap["modules"].items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, mod)
    for p in model.parameters():
        p.requires_grad_(snap["grad"].get(id(p), p.requires_grad))
    if snap["config"] is None:
        if hasattr(model, _CONFIG_ATTR):
            delattr(model, _CONFIG_ATTR)
    else:
        setattr(model, _CONFIG_ATTR, snap["config"])


def checkpoint_info(path: str | os.PathLike) -> dict:
    """The JSON config of a checkpoint (step, seeds, allocation, modules) without loading tensors."""
    return read_checkpoint(path)[0]
