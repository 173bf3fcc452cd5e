"""Tiny offline models and data files for the ``lora-kernels train`` tests: randomly initialised BERT and Llama
(hidden 32, 2 blocks) with a word-level tokenizer built from a fixed vocabulary, saved to a folder."""
from __future__ import annotations

import os
import random

POS = ["good", "great", "fine", "lovely", "superb", "warm", "bright", "fun"]
NEG = ["bad", "awful", "poor", "dull", "boring", "cold", "grim", "weak"]
FILL = ["the", "film", "was", "a", "story", "and", "very", "plot", "cast", "it"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<eos>"]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + POS + NEG + FILL)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", eos_token="<eos>")


def save_bert(path: str, seed: int = 0) -> str:
    import torch
    from transformers import BertConfig, BertModel

    tok = tokenizer()
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_llama(path: str, seed: int = 0) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=4, bos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def sentences(n: int, seed: int = 0, labels=("pos", "neg")) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        lab = labels[i % len(labels)]
        words = POS if lab == labels[0] else NEG
        k = rng.randint(3, 8)
        rows.append((" ".join(rng.choice(words if j % 2 else FILL) for j in range(k)), lab))
    return rows


def write_csv(path: str, n: int = 64, seed: int = 0, sep: str = ",", text="text", label="label") -> str:
    import pandas as pd

    rows = sentences(n, seed)
    pd.DataFrame({text: [r[0] for r in rows], label: [r[1] for r in rows]}).to_csv(path, sep=sep, index=False)
    return path


def write_text(path: str, n: int = 64, seed: int = 0) -> str:
    with open(path, "w") as f:
        for s, _ in sentences(n, seed):
            f.write(s + "\n")
    return path


def make_all(root: str) -> dict[str, str]:
    os.makedirs(root, exist_ok=True)
    return {"bert": save_bert(os.path.join(root, "bert")), "llama": save_llama(os.path.join(root, "llama")),
            "csv": write_csv(os.path.join(root, "data.csv")), "txt": write_text(os.path.join(root, "data.txt"))}


def train_cfg(fx, out, method="lora", model="bert", data="csv", **kw):
    """A ``TrainConfig`` on the tiny fixtures (a model / data key of ``fx`` or a path): 2 steps of 8, no reload
    check, no super-network learned-check (the tiny super-networks cannot learn in a few steps)."""
    from python_api.app import train as T
    base = dict(model=fx.get(model, model), data=fx.get(data, data), method=method, out=str(out), steps=2,
                batch_size=8, progress=False, verify=False, supernet_check=False)
    base.update(kw)
    return T.TrainConfig(**base)


def quiet(*a, **k):
    """A ``log=`` that prints nothing."""


def stop_at(k):
    """An ``after_step`` that stops the run at step ``k`` like a kill (RuntimeError "killed")."""
    def stop(phase, step):
        if step == k:
            raise RuntimeError("killed")
    return stop
