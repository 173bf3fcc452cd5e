"""Lossless adapter checkpoints: one safetensors file of tensors plus one JSON config, in a directory.

``adapter_config.json`` holds the format tag, package version, the adaptation recorded by model surgery
(method, target modules, r / alpha, rank pattern, sharing map, modules to save), each adapted module's
class and shapes (experts and top-k for MoE-LoRA layers), a fingerprint of each base weight, the
allocator's class, step and non-tensor state, RNG seeds and the list of tensor keys.
``adapter_model.safetensors`` holds the adapter tensors (A, B, E, rank masks, routers, trainable heads),
each shared matrix ONCE under its first module, the allocator's tensors under ``__allocator__/`` and the
torch RNG state under ``__rng__/torch``. The config records the tensor file's size and sha256: a tensor
file that does not match (truncated, corrupt, from another save) is refused, naming it.

Loading validates everything (module names, base shapes, tensor keys and shapes, allocator) before any
tensor is written; if rebuilding adapters on a bare base model fails validation the swapped modules are
put back, so a refused checkpoint leaves the model as it was.

Saving is atomic: both files are written into a temporary sibling directory ``.<name>.lk-saving-*`` and
fsynced, then the directory is renamed into place (an existing checkpoint is first renamed aside to
``.<name>.lk-previous`` and removed only after the new one is in place). Whatever fails, and wherever the
process is killed, ``path`` afterwards holds either the previous checkpoint or the new one, bit-exact; in the one
window between the two renames the previous checkpoint sits aside, and :func:`load_adapters` reads it from
there (the next save puts it back). The temporary names are refused by :func:`load_adapters`. One saver per
path at a time: a save removes temporary directories left by interrupted saves of the same path (those whose
process no longer runs).
"""
from __future__ import annotations

import copy
import hashlib
import math
import json
import numbers
import os
import random
import re
import secrets
import shutil
import warnings
from typing import Any

import torch
from torch import nn

from lora_kernels import __version__

from .config import is_binary
from .layers import LoRALinear

FORMAT = "lora_kernels.adapter"
CONFIG_FILE = "adapter_config.json"
TENSOR_FILE = "adapter_model.safetensors"
_ALLOC = "__allocator__/"
_RNG = "__rng__/torch"
_CONFIG_ATTR = "_lora_kernels_config"
_SAVING, _PREVIOUS = ".lk-saving-", ".lk-previous"
_TEMP_NAME = re.compile(r"^\..+(\.lk-saving-[0-9a-f-]+|\.lk-previous)$")


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


def _same_base(w: torch.Tensor, saved: list[float], strict: bool = False) -> bool:
    """Whether weight ``w`` matches a saved fingerprint (sum, sum of squares). Not ``strict``: up to the rounding of
    ``w``'s dtype, whose errors average out over the ``n`` weights (a sum moves by about ``eps·√Σw²``, the sum of
    squares by about ``eps·Σw²/√n``), so the same base cast to bf16 / fp16 matches while a base with other values —
    a merged ΔW of a few percent on a real layer — does not; ``strict``: up to float64 summation only."""
    (s, q), (s0, q0) = _fingerprint(w), saved
    floor_q, floor_s = 1e-6 * max(1.0, abs(q0)), 1e-6 * max(1.0, abs(s0))
    eps = torch.finfo(w.dtype).eps if w.dtype.is_floating_point and not strict else 0.0
    n = max(1, w.numel())
    return abs(q - q0) <= 4 * eps * abs(q0) / math.sqrt(n) + floor_q and \
        abs(s - s0) <= 4 * eps * math.sqrt(max(q0, 0.0)) + floor_s


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
        extra: JSON-able user metadata (str-keyed dicts, lists, str, int, float, bool, None; tuples come back
            as lists); anything else is refused, naming the key, before anything is written.

    ``path`` is replaced atomically (module docstring): after any error, or a kill at any moment, it holds the
    previous checkpoint or the new one, never a mix. An existing directory there must be empty or a checkpoint.
    """
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    _check_json(extra or {}, "extra")
    step, seed = _as_int(step, "step"), _as_int(seed, "seed")
    _split(path)
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
    from safetensors.torch import save as safetensors_bytes

    blob = safetensors_bytes(tensors, metadata={"format": FORMAT, "version": __version__})
    # The config records the tensor file's size and hash, so a tensor file that does not belong to it
    # (truncated, copied from another save) is refused by name instead of loading wrong numbers.
    meta["tensor_file"] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    config = json.dumps(meta, indent=1).encode()
    _write_atomic(path, {TENSOR_FILE: blob, CONFIG_FILE: config})
    return str(path)


def _as_int(v, name: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(v).__name__} {v!r}")
    return int(v)


def _check_json(obj: Any, where: str, stack: tuple = ()) -> None:
    """Refuses (naming the key) what JSON would not store, or would give back as something else."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return
    if id(obj) in stack:
        raise ValueError(f"{where} contains itself (a circular reference): cannot be stored as JSON")
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_json(v, f"{where}[{i}]", stack + (id(obj),))
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has the key {k!r} ({type(k).__name__}): JSON keys must be str")
            _check_json(v, f"{where}[{k!r}]", stack + (id(obj),))
        return
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    raise TypeError(f"{where} is a {kind} ({obj!r:.60}): not JSON-serialisable "
                    "(store str, int, float, bool, None, lists and str-keyed dicts of them)")


# ---- atomic directory write --------------------------------------------------------------------------------
def _split(path: str | os.PathLike) -> tuple[str, str, str]:
    """``(real path, parent, name)``; links are resolved so a linked checkpoint is replaced at its target."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not os.fspath(path).strip():   # "" would silently mean the current directory
        raise ValueError(f"path must name a directory, got {os.fspath(path)!r}")
    full = os.path.realpath(os.fspath(path))
    parent, name = os.path.split(full)
    if not name:
        raise ValueError(f"path must name a directory below a parent, got {os.fspath(path)!r}")
    return full, parent, name


def _is_checkpoint(d: str) -> bool:
    return os.path.isfile(os.path.join(d, CONFIG_FILE)) and os.path.isfile(os.path.join(d, TENSOR_FILE))


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _recover(full: str, parent: str, name: str) -> None:
    """Puts back a previous checkpoint left aside by a save killed between its two renames; drops leftovers."""
    aside = os.path.join(parent, f".{name}{_PREVIOUS}")
    if os.path.isdir(aside):
        if _is_checkpoint(full):
            shutil.rmtree(aside)        # the save had committed: the aside copy is the stale one
        else:
            os.replace(aside, full)     # killed between the renames: the previous checkpoint goes back
    for entry in os.listdir(parent):
        if entry.startswith(f".{name}{_SAVING}") and _TEMP_NAME.match(entry) and not _saver_alive(entry):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _saver_alive(entry: str) -> bool:
    """Whether the process named in a temporary directory (``...lk-saving-<pid hex>-<random>``) still runs here."""
    try:
        pid = int(entry.rsplit(_SAVING, 1)[1].split("-")[0], 16)
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:      # exists, owned by another user
        return True
    return True


def _write_atomic(path: str | os.PathLike, files: dict[str, bytes]) -> None:
    full, parent, name = _split(path)
    if not os.path.isdir(parent):
        os.makedirs(parent)
    _recover(full, parent, name)
    replace = False
    if os.path.lexists(full):
        if not os.path.isdir(full):
            raise CheckpointError(f"{full} exists and is not a directory: cannot save a checkpoint there")
        foreign = sorted(set(os.listdir(full)) - {CONFIG_FILE, TENSOR_FILE})
        if foreign:
            raise CheckpointError(f"{full} holds files that are not part of a lora-kernels checkpoint "
                                  f"({foreign[:5]}{' ...' if len(foreign) > 5 else ''}): a save replaces the whole "
                                  "directory, so choose a new or empty one")
        replace = bool(os.listdir(full))  # an empty directory is replaced by the rename itself
    tmp = os.path.join(parent, f".{name}{_SAVING}{os.getpid():x}-{secrets.token_hex(4)}")
    aside = os.path.join(parent, f".{name}{_PREVIOUS}")
    committed = False
    try:
        os.mkdir(tmp)
        for fname, data in files.items():
            _write_synced(os.path.join(tmp, fname), data)
        _fsync_dir(tmp)
        if replace:
            os.replace(full, aside)
            try:
                os.replace(tmp, full)
            except BaseException:
                os.replace(aside, full)
                raise
        else:
            os.replace(tmp, full)
        committed = True
        _fsync_dir(parent)
    except BaseException as e:
        if not committed:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                e.add_note(f"save_adapters: nothing was written to {full}; "
                           + ("the previous checkpoint there is unchanged" if replace else "no checkpoint there"))
        elif isinstance(e, OSError):
            e.add_note(f"save_adapters: the new checkpoint is in place at {full}, but it may not survive a power loss")
        raise
    if replace:
        try:
            shutil.rmtree(aside)
        except OSError as e:  # the save stands; the next save removes the leftover
            warnings.warn(f"save_adapters: could not remove the previous checkpoint at {aside}: {e}", stacklevel=3)


def _py_state():
    v, state, gauss = random.getstate()
    return [v, list(state), gauss]


# ---- load -----------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a checkpoint directory, after checking it is one and that its files are whole."""
    d = os.fspath(path)
    full, parent, name = _split(d)
    if _TEMP_NAME.match(name):
        real = re.sub(r"^\.|(\.lk-saving-[0-9a-f-]+|\.lk-previous)$", "", name)
        raise CheckpointError(f"{d} is a temporary directory of an interrupted save_adapters, not a checkpoint: "
                              f"load {os.path.join(parent, real)} instead")
    if not os.path.exists(full):
        aside = os.path.join(parent, f".{name}{_PREVIOUS}")
        if not _is_checkpoint(aside):
            raise CheckpointError(f"{d} not found: not a lora-kernels adapter checkpoint")
        warnings.warn(f"{d} is missing because a save was interrupted; loading the previous checkpoint from {aside} "
                      "(the next save_adapters to this path puts it back)", stacklevel=3)
        full = aside
    if not os.path.isdir(full):
        raise CheckpointError(f"{d} is not a directory: a lora-kernels checkpoint is a directory")
    cfg_path, t_path = os.path.join(full, CONFIG_FILE), os.path.join(full, TENSOR_FILE)
    for p in (cfg_path, t_path):
        if not os.path.exists(p):
            raise CheckpointError(f"{p} not found: {d} is not a lora-kernels adapter checkpoint")
    meta = _read_config(cfg_path)
    with open(t_path, "rb") as f:
        blob = f.read()
    rec = meta.get("tensor_file")
    if rec is not None:  # absent in checkpoints written before the record existed
        if len(blob) != rec.get("bytes"):
            raise CheckpointError(f"{t_path} is {len(blob)} bytes, {CONFIG_FILE} records {rec.get('bytes')}: "
                                  "the tensor file is truncated or belongs to another save")
        if hashlib.sha256(blob).hexdigest() != rec.get("sha256"):
            raise CheckpointError(f"{t_path} does not match the sha256 recorded in {CONFIG_FILE}: "
                                  "the tensor file is corrupt or belongs to another save")
    from safetensors.torch import load as safetensors_load

    try:
        tensors = safetensors_load(blob)
    except Exception as e:  # safetensors' own error names neither the file nor the cause plainly
        raise CheckpointError(f"{t_path} is not a readable safetensors file ({len(blob)} bytes; truncated or "
                              f"corrupt): {e}") from e
    return meta, tensors


_SPEC_KEYS = {"class": str, "in_features": int, "out_features": int, "r": int, "alpha": (int, float),
              "dropout": (int, float), "base_fingerprint": list}
_MOE_KEYS = {"num_experts": int, "top_k": int, "load_balance_coef": (int, float)}


def _read_config(cfg_path: str) -> dict:
    """The parsed config, refusing (naming the file and the entry) anything the loader could trip over later."""
    try:
        with open(cfg_path, "rb") as f:
            meta = json.loads(f.read())
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not UTF-8 text (corrupt): {e}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON (truncated or corrupt): {e}") from e

    def bad(what: str):
        return CheckpointError(f"{cfg_path}: {what}")

    if not isinstance(meta, dict):
        raise bad(f"the top level is a {type(meta).__name__}, expected an object")
    if meta.get("format") != FORMAT:
        raise bad(f"format is {meta.get('format')!r}, expected {FORMAT!r} (not a lora-kernels checkpoint)")
    for key, kind in (("modules", dict), ("adaptation", dict), ("seeds", dict)):
        if key not in meta:
            raise bad(f"no {key!r} entry (truncated or hand-edited)")
        if not isinstance(meta[key], kind):
            raise bad(f"{key!r} is a {type(meta[key]).__name__}, expected an object")
    if not meta["modules"]:
        raise bad("'modules' is empty: the checkpoint holds no adapted module")
    for name, spec in meta["modules"].items():
        if not isinstance(spec, dict):
            raise bad(f"modules[{name!r}] is a {type(spec).__name__}, expected an object")
        keys = {**_SPEC_KEYS, **(_MOE_KEYS if spec.get("class") == "MoELoRALinear" else {})}
        for k, kind in keys.items():
            if k not in spec:
                raise bad(f"modules[{name!r}] has no {k!r}")
            if not isinstance(spec[k], kind) or isinstance(spec[k], bool):
                raise bad(f"modules[{name!r}][{k!r}] is {spec[k]!r}, expected {getattr(kind, '__name__', 'a number')}")
    alloc = meta.get("allocator")
    if alloc is not None and not (isinstance(alloc, dict) and "class" in alloc and "state" in alloc):
        raise bad("'allocator' must be null or an object with 'class' and 'state'")
    rec = meta.get("tensor_file")
    if rec is not None and not isinstance(rec, dict):
        raise bad(f"'tensor_file' is a {type(rec).__name__}, expected an object")
    return meta


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
            specs[name]["top_k"], specs[name]["load_balance_coef"]).train(lin.training), after=unfreeze_heads,
            freeze=True)
        setattr(model, _CONFIG_ATTR, dict(cfg))
    else:
        from .surgery import apply_from_config

        apply_from_config(model, cfg)
        # a parameter the user unfroze by hand (outside modules_to_save) was saved as trainable: it trains again
        stored = set(meta.get("tensors", []))
        for pname, p in model.named_parameters():
            if pname in stored:
                p.requires_grad_(True)


def _check_structure(model: nn.Module, meta: dict) -> None:
    have = _module_specs(model)
    want = meta["modules"]
    if set(have) != set(want):
        missing, unknown = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        raise CheckpointError(f"adapted modules differ: in the checkpoint only {missing[:6]}, "
                              f"in the model only {unknown[:6]}")
    # alpha too: the model's scaling (alpha / r) multiplies every loaded B, so a model built with another alpha
    # would silently give other outputs from the same tensors (dropout is only warned about, below)
    keys = ("class", "r", "in_features", "out_features", "svd", "num_experts", "top_k", "alpha")
    merged = [n for n in want if have[n].get("merged")]
    if merged:   # a merged layer's forward reads its merged weight: loaded A/B would not reach the outputs
        raise CheckpointError(f"modules {merged[:6]} are merged (LoRALinear.merge): unmerge them before loading")
    for name in want:
        diff = {k: (have[name].get(k), want[name].get(k)) for k in keys if have[name].get(k) != want[name].get(k)}
        if diff:
            raise CheckpointError(f"module {name!r} differs from the checkpoint (model, checkpoint): {diff}")
    # dropout changes training, not outputs in eval: said, not refused (an inference model adapted at dropout 0)
    drop = {n: (have[n].get("dropout"), want[n].get("dropout")) for n in want
            if have[n].get("dropout") != want[n].get("dropout")}
    if drop:
        name, (m_d, c_d) = next(iter(drop.items()))
        warnings.warn(f"dropout differs from the checkpoint in {len(drop)} module(s), e.g. {name!r}: model {m_d}, "
                      f"checkpoint {c_d}; the model's dropout is kept", stacklevel=3)
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
    # values a copy_ would take silently: integers into a float weight, a 0.5 or 2 in a bool rank mask becomes
    # True, a NaN poisons every output
    ints = [k for k, t in live.items() if t.is_floating_point() and not stored[k].is_floating_point()]
    if ints:
        raise CheckpointError(f"integer values for floating-point tensors: "
                              f"{[f'{k} ({stored[k].dtype})' for k in ints[:4]]}")
    not01 = [k for k, t in live.items() if t.dtype == torch.bool and not is_binary(stored[k])]
    if not01:
        raise CheckpointError(f"rank masks must hold 0/1 values: {not01[:4]}")
    nonfinite = [k for k in live if stored[k].is_floating_point() and not bool(torch.isfinite(stored[k]).all())]
    if nonfinite:
        raise CheckpointError(f"tensors with NaN/Inf values: {nonfinite[:4]}")
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
    from .surgery import _STASH_ATTR
    if getattr(model, _STASH_ATTR, None):
        raise CheckpointError(f"{path}: the model has adapters merged reversibly (merge_adapters(reversible=True)): "
                              "loading others now would add their ΔW to the merged weights, and unmerge_adapters "
                              "would then drop them; unmerge_adapters(model) first")
    merged = bool((getattr(model, _CONFIG_ATTR, None) or {}).get("merged"))
    # one pass over the base weights; a model recorded as merged is compared strictly (a merged ΔW can be within a
    # cast's rounding)
    moved = [n for n, spec in meta["modules"].items()
             if not _same_base(model.get_submodule(n).weight, spec["base_fingerprint"], strict=merged)]
    if moved and merged:
        raise CheckpointError(f"{path}: the model's weights have adapters merged in (merge_adapters), so "
                              f"{moved[0]!r} is not the base these adapters were trained on: loading them would apply "
                              "a ΔW twice; load into the unmerged base model")
    rebuilt = None
    if not _adapted(model):
        rebuilt = _snapshot(model, meta["modules"])
        try:
            _rebuild(model, meta)
        except Exception as e:
            _restore(model, rebuilt)
            raise CheckpointError(f"{path}: the recorded adapters cannot be rebuilt on this model: {e}") from e
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
    if moved:
        warnings.warn(f"base weight of {moved[0]!r} differs from the one the adapters were trained on "
                      "(same shape, other values)", stacklevel=2)
    before = {k: t.detach().clone() for k, t in live.items()} if alloc_state is not None else None
    alloc_before = copy.deepcopy(allocator.state_dict()) if alloc_state is not None else None
    with torch.no_grad():
        for k, t in live.items():
            t.copy_(tensors[k])
    if alloc_state is not None:
        try:
            allocator.load_state_dict(alloc_state)
        except Exception as e:   # nothing half-loaded: the adapters go back to what they were before this call
            with torch.no_grad():
                for k, t in live.items():
                    t.copy_(before[k])
            try:   # an allocator that failed part-way gets its own state back
                allocator.load_state_dict(alloc_before)
            except Exception:
                pass
            if rebuilt is not None:
                _restore(model, rebuilt)
            raise CheckpointError(f"{path}: allocator= ({type(allocator).__name__}) cannot take the stored allocator "
                                  f"state: {e}; nothing was loaded") from e
    if restore_rng:
        torch.set_rng_state(tensors[_RNG])
        v, state, gauss = meta["seeds"]["python_random_state"]
        random.setstate((v, tuple(state), gauss))
    return model


def _snapshot(model: nn.Module, specs: dict) -> dict:
    # every module, not only the checkpoint's: the rebuild adapts whatever the recorded targets match, which on a
    # larger model is more than the checkpoint holds (and is then refused)
    return {"modules": dict(model.named_modules(remove_duplicate=False)),
            "children": {id(m): dict(m._modules) for m in model.modules()},
            "grad": {id(p): p.requires_grad for p in model.parameters()},
            "config": getattr(model, _CONFIG_ATTR, None)}


def _restore(model: nn.Module, snap: dict) -> None:
    """Puts every module of the snapshot back where it was (children replaced or added since are undone)."""
    for mod in snap["modules"].values():
        kids = snap["children"].get(id(mod))
        if kids is not None and dict(mod._modules) != kids:
            mod._modules.clear()
            mod._modules.update(kids)
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
