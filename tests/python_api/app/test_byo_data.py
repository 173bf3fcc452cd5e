"""Data loading for ``lora-kernels train``: every format reads to the same examples; seeded, stratified splits."""
from __future__ import annotations

import pytest

from python_api.app import byo_data as D

from . import byo_fixtures as F

pd = pytest.importorskip("pandas")


@pytest.fixture()
def frame():
    rows = F.sentences(60, seed=3, labels=("pos", "neg", "mid"))
    return pd.DataFrame({"sentence": [r[0] for r in rows], "y": [r[1] for r in rows]})


def test_every_format_reads_the_same_examples(tmp_path, frame):
    datasets = pytest.importorskip("datasets")
    paths = {"csv": tmp_path / "d.csv", "tsv": tmp_path / "d.tsv", "jsonl": tmp_path / "d.jsonl",
             "json_lines": tmp_path / "l.json", "json_array": tmp_path / "a.json",
             "parquet": tmp_path / "d.parquet", "dir": tmp_path / "saved"}
    frame.to_csv(paths["csv"], index=False)
    frame.to_csv(paths["tsv"], sep="\t", index=False)
    frame.to_json(paths["jsonl"], orient="records", lines=True)
    frame.to_json(paths["json_lines"], orient="records", lines=True)
    paths["json_array"].write_text("\n  " + frame.to_json(orient="records", indent=1))   # one array of records
    frame.to_parquet(paths["parquet"])
    datasets.Dataset.from_pandas(frame).save_to_disk(str(paths["dir"]))
    got = {k: D.load_examples(str(p), label_column="y") for k, p in paths.items()}
    ref, info = got["csv"]
    assert info["text_column"] == "sentence" and info["task"] == "classify"
    assert ref.label_names == ["mid", "neg", "pos"]
    for k, (ex, _) in got.items():
        assert ex.texts == ref.texts and ex.labels == ref.labels, k


def test_text_file_is_causal_lm(tmp_path):
    p = F.write_text(str(tmp_path / "t.txt"), n=10)
    ex, info = D.load_examples(p)
    assert info["task"] == "causal-lm" and ex.labels is None and len(ex) == 10


def test_split_is_seeded_and_stratified(frame):
    ex = D.Examples(frame["sentence"].tolist(), [i % 3 for i in range(60)], ["a", "b", "c"])
    a = D.split(ex, 0.1, 0.2, seed=0)
    b = D.split(ex, 0.1, 0.2, seed=0)
    c = D.split(ex, 0.1, 0.2, seed=1)
    assert a["test"].texts == b["test"].texts and a["test"].texts != c["test"].texts
    assert {k: len(v) for k, v in a.items()} == {"train": 42, "validation": 6, "test": 12}
    for part in a.values():                    # 20 per class: each split keeps one third of each class
        counts = [part.labels.count(k) for k in range(3)]
        assert max(counts) == min(counts), counts
    assert sorted(a["train"].texts + a["validation"].texts + a["test"].texts) == sorted(ex.texts)


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_the_only_text_column_is_the_text_whatever_its_name(tmp_path, frame, ext):
    # pandas 3 reads text as its str dtype, pandas 2 as object: both are "the only string column"
    p = tmp_path / f"d.{ext}"

    def write(df):
        {"csv": lambda: df.to_csv(p, index=False), "jsonl": lambda: df.to_json(p, orient="records", lines=True),
         "parquet": lambda: df.to_parquet(p)}[ext]()
    df = frame.rename(columns={"sentence": "body"}).assign(label=[len(t) % 2 for t in frame["sentence"]])
    write(df)
    with pytest.raises(D.BadInput, match="cannot tell the text column; pass --text-column"):
        D.load_examples(str(p))   # two text columns (body, y): which one is the text is not guessed
    write(df.drop(columns="y"))
    ex, info = D.load_examples(str(p))
    assert info["text_column"] == "body" and info["task"] == "classify"
    assert ex.texts == list(frame["sentence"])


def test_column_errors_name_the_columns(tmp_path, frame):
    p = tmp_path / "d.csv"
    frame.to_csv(p, index=False)
    with pytest.raises(D.BadInput, match=r"no column 'label'.*columns found: \['sentence', 'y'\]"):
        D.load_examples(str(p), label_column="label")
    with pytest.raises(D.BadInput, match="classify needs a label column"):
        D.load_examples(str(p), task="classify")
    ex, info = D.load_examples(str(p))          # no label column by default name: text only, causal LM
    assert info["task"] == "causal-lm"
