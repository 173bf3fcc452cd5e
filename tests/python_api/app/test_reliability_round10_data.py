"""Round 10 of careful misuse of ``lora-kernels train``'s inputs: an encoder trained as a causal LM, column names with
spaces or repeats, UTF-8 byte-order marks, out-of-range seeds, label spellings that pandas merges, and text that
pandas reads as missing."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from python_api.app import byo_data as D
from python_api.app import byo_model as M
from python_api.app import cli

from . import byo_fixtures as F

pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import GPT2Config, GPT2LMHeadModel

    root = str(tmp_path_factory.mktemp("r10"))
    out = {"bert": F.save_bert(os.path.join(root, "bert")), "llama": F.save_llama(os.path.join(root, "llama"))}
    dec = F.save_bert(os.path.join(root, "bert_decoder"))      # the same BERT, made causal by its config
    with open(os.path.join(dec, "config.json")) as f:
        cfg = json.load(f)
    cfg["is_decoder"] = True
    with open(os.path.join(dec, "config.json"), "w") as f:
        json.dump(cfg, f)
    out["bert_decoder"] = dec
    tok = F.tokenizer()
    torch.manual_seed(0)
    gpt2 = os.path.join(root, "gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                               bos_token_id=2, eos_token_id=4)).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    out["gpt2"] = gpt2
    out["txt"] = F.write_text(os.path.join(root, "data.txt"), n=40)
    return out


def _main(capsys, *argv):
    try:
        rc = cli.main(["train", *argv, "--no-progress"])
    except SystemExit as e:       # argparse's own refusals
        rc = e.code
    return rc, capsys.readouterr().err.strip()


def _write(path, text: str, bom: bool = False) -> str:
    with open(path, "wb") as f:
        f.write((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return str(path)


# ---- 1. an encoder-only model loaded for causal LM --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoder_loaded_as_causal_lm_is_refused(models, dtype):
    with pytest.raises(D.BadInput, match=r"^--model: .*BertLMHeadModel is not a causal LM: it attends to later "
                                         r"tokens.*\"is_decoder\": true in its config.json makes it causal"):
        src = M.resolve(models["bert"])
        M.load_model(src, "causal-lm", None, 0, M.load_tokenizer(src), dtype)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert_decoder"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoders_pass_the_causal_check(models, name, dtype):
    src = M.resolve(models[name])
    tok = M.load_tokenizer(src)
    model = M.load_model(src, "causal-lm", None, 0, tok, dtype)
    assert not model.training
    state = torch.get_rng_state()
    M._check_causal(src, model, tok)         # no random numbers drawn: the run's seeded stream is unchanged
    assert torch.equal(state, torch.get_rng_state())


def test_cli_causal_lm_on_an_encoder_exits_2_before_writing(models, tmp_path, capsys):
    out = tmp_path / "o"
    rc, err = _main(capsys, "--model", models["bert"], "--data", models["txt"], "--method", "lora", "--out", str(out),
                    "--steps", "1")
    assert rc == 2 and "--model" in err and "attends to later tokens" in err, err
    assert len(err.splitlines()) == 1 and not out.exists()


# ---- 2. header names with surrounding spaces, repeated header names ---------------------------------------------
@pytest.mark.parametrize("sep, ext", [(",", "csv"), ("\t", "tsv")])
def test_space_after_the_comma_in_the_header_still_finds_the_label(tmp_path, sep, ext):
    rows = "".join(f"{t}{sep} {y}\n" for t, y in F.sentences(20, labels=("pos", "neg")))
    p = _write(tmp_path / f"d.{ext}", f"text{sep} label\n" + rows)
    with pytest.warns(UserWarning, match=r"d\.%s: surrounding whitespace removed from column names \[' label'\]"
                      % ext):
        ex, info = D.load_examples(p)
    assert info["task"] == "classify" and info["label_column"] == "label" and ex.label_names == ["neg", "pos"]
    with pytest.warns(UserWarning):   # the name as the header spells it finds the column too
        assert D.load_examples(p, label_column=" label")[1]["label_column"] == "label"


def test_names_that_collide_once_stripped_are_refused(tmp_path):
    p = _write(tmp_path / "d.csv", "text,label, label\ngood film,pos,1\nbad film,neg,0\n")
    with pytest.raises(D.BadInput, match=r"^--data: .*d\.csv: columns 'label' and ' label' are both column 'label'"):
        D.load_examples(p)


@pytest.mark.parametrize("sep, ext", [(",", "csv"), ("\t", "tsv")])
def test_repeated_header_name_is_refused(tmp_path, sep, ext):
    p = _write(tmp_path / f"d.{ext}", sep.join(["text", "label", "label"]) + "\n"
               + "".join(sep.join([t, y, "x"]) + "\n" for t, y in F.sentences(10)))
    with pytest.raises(D.BadInput, match=r"^--data: .*d\.%s: column 'label' appears more than once" % ext):
        D.load_examples(p)


# ---- 3. UTF-8 byte-order mark -----------------------------------------------------------------------------------
BOM_FILES = {
    "bom.csv": "text,label\nhello world,a\ngood film,b\n",
    "bom.tsv": "text\tlabel\nhello world\ta\ngood film\tb\n",
    "bom.jsonl": '{"text": "hello world", "label": "a"}\n{"text": "good film", "label": "b"}\n',
    "bom_lines.json": '{"text": "hello world", "label": "a"}\n{"text": "good film", "label": "b"}\n',
    "bom_array.json": '[{"text": "hello world", "label": "a"}, {"text": "good film", "label": "b"}]\n',
    "bom.txt": "hello world\ngood film\n",
}


@pytest.mark.parametrize("name", sorted(BOM_FILES))
def test_byte_order_mark_is_removed_in_every_text_format(tmp_path, name):
    ex, info = D.load_examples(_write(tmp_path / name, BOM_FILES[name], bom=True))
    assert ex.texts == ["hello world", "good film"]
    assert info["text_column"] == "text"
    if not name.endswith(".txt"):
        assert info["task"] == "classify" and ex.label_names == ["a", "b"]


# ---- 4. --seed range --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", ["99999999999999999999", str(2 ** 32), "-1", "1.5", "x"])
def test_seed_out_of_range_is_an_argument_error_naming_seed(tmp_path, capsys, seed):
    out = tmp_path / "o"
    rc, err = _main(capsys, "--model", "m", "--data", "d.csv", "--method", "lora", "--out", str(out),
                    f"--seed={seed}")
    assert rc == 2 and "argument --seed" in err and "0 to 4294967295" in err, err
    assert not out.exists()


@pytest.mark.parametrize("seed", ["0", "7", str(2 ** 32 - 1)])
def test_seed_in_range_parses(seed):
    from python_api.app.argtypes import seed as parse_seed
    assert parse_seed(seed) == int(seed)


@pytest.mark.parametrize("command", ["demo", "alloc", "profile"])
def test_seed_of_the_bundled_commands_is_checked_too(tmp_path, capsys, command):
    from python_api.app import cli
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--out", str(tmp_path / "o"), "--seed", str(2 ** 64)])
    assert e.value.code == 2 and "argument --seed" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---- 5. label spellings, text that pandas reads as missing ------------------------------------------------------
def test_numeric_label_spellings_that_merge_are_said(tmp_path):
    rows = ["good film,01", "great plot,1", "bad film,2", "dull cast,2", "fine story,1", "weak plot,2"]
    p = _write(tmp_path / "d.csv", "text,label\n" + "\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match=r"d\.csv: labels \['01', '1'\] in column 'label' are read as the same "
                                         r"number, one class \('1'\)"):
        ex, _ = D.load_examples(p)
    assert ex.label_names == ["1", "2"]     # numeric labels stay numbers: ordered, the same class in every file
    p2 = _write(tmp_path / "plain.csv", "text,label\n" + "\n".join(r.replace("01", "1") for r in rows) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # one spelling per class: nothing to say
        assert D.load_examples(p2)[0].label_names == ["1", "2"]


def test_json_string_labels_keep_their_spelling(tmp_path):
    rows = [("good film", "01"), ("great plot", "1"), ("bad film", "2"), ("fine story", "01")]
    p = _write(tmp_path / "d.jsonl", "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    ex, _ = D.load_examples(p)
    assert sorted(ex.label_names) == ["01", "1", "2"]
    assert [ex.label_names[i] for i in ex.labels] == [y for _, y in rows]


@pytest.mark.parametrize("sep, ext", [(",", "csv"), ("\t", "tsv")])
def test_literal_none_and_na_in_the_text_column_are_text(tmp_path, sep, ext):
    texts = ["good film", "None", "NA", "null", "bad film", "nan"]
    p = _write(tmp_path / f"d.{ext}", f"text{sep}label\n" + "".join(f"{t}{sep}{'ab'[i % 2]}\n"
                                                                     for i, t in enumerate(texts)))
    ex, _ = D.load_examples(p)
    assert ex.texts == texts and ex.labels == [0, 1, 0, 1, 0, 1]


def test_literal_na_text_with_an_index_column(tmp_path):
    p = str(tmp_path / "d.csv")                # DataFrame.to_csv's default: an unnamed index column first
    pd.DataFrame({"text": ["good film", "NA", "bad film"], "label": ["a", "b", "a"]}).to_csv(p)
    assert D.load_examples(p)[0].texts == ["good film", "NA", "bad film"]


def test_empty_text_cell_is_still_missing(tmp_path):
    p = _write(tmp_path / "d.csv", "text,label\ngood film,a\nNone,b\n,a\nbad film,b\n")
    with pytest.raises(D.BadInput, match=r"column 'text' has 1 missing values \(first at row 2\)"):
        D.load_examples(p)


def test_json_digit_string_labels_keep_numeric_order(tmp_path):
    # twelve classes "0" … "11" in JSON lines: ordered as numbers, the same class indices as the CSV of the same data
    rows = [f'{{"text": "t{i}", "label": "{i % 12}"}}' for i in range(24)]
    ex, _ = D.load_examples(_write(tmp_path / "d.jsonl", "\n".join(rows) + "\n"))
    assert ex.label_names == [str(i) for i in range(12)]
    csv = _write(tmp_path / "d.csv", "text,label\n" + "".join(f"t{i},{i % 12}\n" for i in range(24)))
    ex_csv, _ = D.load_examples(csv)
    assert ex_csv.label_names == ex.label_names and ex_csv.labels == ex.labels


def test_whole_float_labels_are_the_integer_classes(tmp_path):
    # pandas writes a float label column as 0.0 / 1.0: the same classes as an evaluation file with 0 / 1
    rows = [f'{{"text": "t{i}", "label": {float(i % 2)}}}' for i in range(8)]
    ex, _ = D.load_examples(_write(tmp_path / "d.jsonl", "\n".join(rows) + "\n"))
    assert ex.label_names == ["0", "1"]
    ev = _write(tmp_path / "ev.csv", "text,label\na,0\nb,1\n")
    ev_ex, _ = D.load_examples(ev, label_names=ex.label_names, arg="--eval-data")
    assert ev_ex.labels == [0, 1]
