"""``lora-kernels train`` and the library under careful misuse (round 11): a fine-tuned classifier's own label
ids, list- and dict-valued labels, fractions that leave a class without training rows, ``--resume`` after the
model's weights changed, options the method does not use, a ';'-separated CSV. Tiny fixtures (random BERT /
Llama, hidden 32, 2 blocks)."""
from __future__ import annotations

import json
import re

import pytest
import torch

from python_api.app import train as T
from python_api.app.byo_data import BadInput

from . import byo_fixtures as F

pytest.importorskip("peft")
pd = pytest.importorskip("pandas")


cfg, quiet, _stop_at = F.train_cfg, F.quiet, F.stop_at


def _classifier(path, id2label: dict[int, str], favour: int) -> str:
    """A saved 2-label classifier whose head always predicts id ``favour``."""
    from transformers import BertConfig, BertForSequenceClassification
    tok = F.tokenizer()
    torch.manual_seed(0)
    c = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=64, pad_token_id=0, num_labels=2,
                   id2label=id2label, label2id={v: k for k, v in id2label.items()})
    m = BertForSequenceClassification(c)
    with torch.no_grad():
        m.classifier.weight.zero_()
        m.classifier.bias.copy_(torch.tensor([5.0, -5.0]) if favour == 0 else torch.tensor([-5.0, 5.0]))
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _skewed(path, names=("pos", "neg")) -> str:
    rows = F.sentences(100)
    pd.DataFrame({"text": [r[0] for r in rows],
                  "label": [names[0] if i % 5 else names[1] for i in range(100)]}).to_csv(path, index=False)
    return str(path)


# ---- 1. a fine-tuned classifier keeps what its head's ids mean ------------------------------------------------
@pytest.mark.parametrize("spelling", [("pos", "neg"), ("POS", "NEG")])
def test_finetuned_classifier_keeps_its_label_ids(fx, tmp_path, spelling):
    # the head says id 0 = "pos" and always predicts it; the data is 80% "pos". Sorted order would make "neg"
    # id 0 and turn the head's answers around (accuracy 0.2 instead of 0.8)
    model = _classifier(tmp_path / "cls", {0: "pos", 1: "neg"}, favour=0)
    data = _skewed(tmp_path / "d.csv", spelling)
    P = T.prepare(cfg(fx, tmp_path / "o", model=model, data=data), log=quiet, check_output=False)
    train = P["splits"]["train"]
    assert train.label_names == list(spelling)                # the data's spellings, in the head's id order
    assert P["base"].config.id2label == {0: spelling[0], 1: spelling[1]}
    m = T.run(cfg(fx, tmp_path / "o", model=model, data=data, steps=1, lr=1e-9, merge=True), log=quiet)
    test = P["splits"]["test"]
    majority = sum(lab == 0 for lab in test.labels) / len(test)
    assert majority > 0.5 and m["test_accuracy"] == pytest.approx(majority)
    saved = json.load(open(tmp_path / "o" / "merged" / "config.json"))
    assert saved["id2label"] == {"0": spelling[0], "1": spelling[1]}


def test_finetuned_classifier_with_other_names_warns(fx, tmp_path):
    model = _classifier(tmp_path / "cls", {0: "positive", 1: "negative"}, favour=0)
    data = _skewed(tmp_path / "d.csv")
    with pytest.warns(UserWarning, match=r"head names its classes \['positive', 'negative'\].*rename"):
        P = T.prepare(cfg(fx, tmp_path / "o", model=model, data=data), log=quiet, check_output=False)
    assert P["splits"]["train"].label_names == ["neg", "pos"]


def test_default_head_names_follow_the_data(fx, tmp_path):
    model = _classifier(tmp_path / "cls", {0: "LABEL_0", 1: "LABEL_1"}, favour=0)
    P = T.prepare(cfg(fx, tmp_path / "o", model=model, data=_skewed(tmp_path / "d.csv")), log=quiet,
                  check_output=False)
    assert P["splits"]["train"].label_names == ["neg", "pos"]


# ---- 2. list- and dict-valued labels --------------------------------------------------------------------------
@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
@pytest.mark.parametrize("labels", [[["neg", "other"], ["pos"]], [{"a": 1}, {"a": 0}], [[1, 0], [0, 1]]])
def test_list_or_dict_labels_are_refused(tmp_path, ext, labels):
    from python_api.app import byo_data as D
    rows = F.sentences(20)
    df = pd.DataFrame({"text": [r[0] for r in rows], "labels": [labels[i % 2] for i in range(20)]})
    p = tmp_path / f"d.{ext}"
    if ext == "jsonl":
        df.to_json(p, orient="records", lines=True)
    else:
        pytest.importorskip("pyarrow")
        df.to_parquet(p)
    with pytest.raises(BadInput, match=rf"{p}: label column 'labels' holds a (list|dict) at row 0 .*one class "
                                       r"label per row"):
        D.load_examples(str(p))


# ---- 3. fractions near 1/2 never leave a class without training rows -----------------------------------------
@pytest.mark.parametrize("sizes", [(10, 90), (3, 50), (4, 4), (11, 30)])
@pytest.mark.parametrize("fracs", [(0.45, 0.45), (0.5, 0.45), (0.34, 0.33)])
def test_every_class_keeps_training_rows(sizes, fracs):
    from python_api.app import byo_data as D
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    ex = D.Examples([f"t{i}" for i in range(len(labels))], labels, ["a", "b"])
    parts = D.split(ex, fracs[0], fracs[1], seed=0)
    for c, n in enumerate(sizes):
        got = {k: sum(y == c for y in v.labels) for k, v in parts.items()}
        assert got["train"] >= 1 and sum(got.values()) == n, (c, got)
        assert got["validation"] >= 1 and got["test"] >= 1     # every class of 3 or more rows is in all three


# ---- 4. --resume after the model's weights changed ------------------------------------------------------------
def test_resume_refuses_changed_weights_and_accepts_an_old_marker(fx, tmp_path):
    model = F.save_bert(str(tmp_path / "m"), seed=0)
    c = dict(model=model, steps=3, save_every=1)
    for out in (tmp_path / "o", tmp_path / "old"):
        with pytest.raises(RuntimeError, match="killed"):
            T.run(cfg(fx, out, **c), log=quiet, after_step=_stop_at(2))
        assert len(json.load(open(out / T.MARKER))["model_sha256"]) == 64
    F.save_bert(model, seed=1)                                # same folder and config.json, other weights
    with pytest.raises(BadInput, match=r"^--model: .*its weights changed since the checkpoint"):
        T.run(cfg(fx, tmp_path / "o", resume=True, **c), log=quiet)
    marker = json.load(open(tmp_path / "old" / T.MARKER))
    del marker["model_sha256"]                                # a marker from before the hash: not checked
    with open(tmp_path / "old" / T.MARKER, "w") as f:
        json.dump(marker, f)
    assert len(T.run(cfg(fx, tmp_path / "old", resume=True, **c), log=quiet)["losses"]["train"]) == 3
    F.save_bert(model, seed=0)                                # the weights it started with: resumes
    assert len(T.run(cfg(fx, tmp_path / "o", resume=True, **c), log=quiet)["losses"]["train"]) == 3


# ---- 5. an option the method does not use is refused, not ignored ---------------------------------------------
@pytest.mark.parametrize("method, extra, flag", [
    ("lora", ["--budget", "5"], "--budget"), ("sharelora-a", ["--r-init", "2"], "--r-init"),
    ("moe-uniform", ["--beta", "9"], "--beta"), ("adalora", ["--expert-r", "3"], "--expert-r"),
    ("adalora", ["--no-supernet-check"], "--no-supernet-check")])
def test_options_the_method_does_not_use_are_refused(fx, tmp_path, capsys, method, extra, flag):
    from python_api.app import cli
    out = tmp_path / "o"
    rc = cli.main(["train", "--model", fx["bert"], "--data", fx["csv"], "--method", method, "--steps", "1",
                   "--batch-size", "8", "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(f"lora-kernels train: error: {flag}: used only by ") and f"not {method}" in err
    assert not out.exists()                                   # refused before anything is written


# ---- 6. a CSV separated by another character ------------------------------------------------------------------
@pytest.mark.parametrize("sep", [";", "|", "\t"])
def test_a_csv_separated_by_another_character_is_refused(tmp_path, sep):
    from python_api.app import byo_data as D
    p = tmp_path / "d.csv"
    rows = F.sentences(10)
    p.write_text(f"text{sep}label\n" + "".join(f"{t}{sep}{y}\n" for t, y in rows))
    with pytest.raises(BadInput, match=rf"one column .*looks {re.escape(repr(sep))}-separated.*save it with commas"):
        D.load_examples(str(p))
    p.write_text("text\n" + "".join(f"{t}; and more\n" for t, _ in rows))   # a one-column file whose texts hold ';'
    ex, info = D.load_examples(str(p))
    assert info["task"] == "causal-lm" and len(ex) == 10


def test_weights_hash_reads_only_the_weights_transformers_loads(tmp_path):
    from python_api.app import byo_model as M
    for f in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tf_model.h5",
              "optimizer.pt", "training_args.bin"):
        (tmp_path / f).write_bytes(f.encode())
    src = M.ModelSource("m", str(tmp_path), gguf=False)
    first = M.weights_sha256(src)
    for f in ("tf_model.h5", "optimizer.pt", "training_args.bin"):   # not read
        (tmp_path / f).write_bytes(b"other")
    assert M.weights_sha256(src) == first
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"other")   # a shard is
    assert M.weights_sha256(src) != first


def test_integer_labels_are_the_head_ids(fx, tmp_path):
    import warnings
    model = _classifier(tmp_path / "cls", {0: "NEGATIVE", 1: "POSITIVE"}, favour=0)   # the GLUE / SST-2 case
    data = _skewed(tmp_path / "d.csv", ("1", "0"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        P = T.prepare(cfg(fx, tmp_path / "o", model=model, data=data), log=quiet, check_output=False)
    assert P["splits"]["train"].label_names == ["0", "1"]


def test_resume_refuses_a_changed_class_numbering(fx, tmp_path):
    out = tmp_path / "o"
    c = dict(steps=3, save_every=1)
    with pytest.raises(RuntimeError, match="killed"):
        T.run(cfg(fx, out, **c), log=quiet, after_step=_stop_at(2))
    marker = json.load(open(out / T.MARKER))
    assert marker["label_names"] == ["neg", "pos"]
    marker["label_names"] = ["pos", "neg"]                    # as numbered by another version
    with open(out / T.MARKER, "w") as f:
        json.dump(marker, f)
    with pytest.raises(BadInput, match=r"^--resume: .*numbers the classes \['pos', 'neg'\]"):
        T.run(cfg(fx, out, resume=True, **c), log=quiet)
    del marker["label_names"]                                 # a marker from before: not checked
    with open(out / T.MARKER, "w") as f:
        json.dump(marker, f)
    assert len(T.run(cfg(fx, out, resume=True, **c), log=quiet)["losses"]["train"]) == 3
