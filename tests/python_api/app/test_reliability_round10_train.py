"""``lora-kernels train`` / ``alloc`` under careful misuse (round 10): ``--overwrite`` on a directory that is not
ours, NaN losses and NaN weights, ``--targets`` outside block 0 for the MoE methods, an error before the first
checkpoint, ``--resume`` after the data changed, a ``.txt`` ``--eval-data`` next to a table, ``alloc --out`` over a
user's files, a damaged checkpoint. Tiny fixtures (random BERT / Llama, hidden 32, 2 blocks)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from python_api.app import cli
from python_api.app import train as T
from python_api.app.byo_data import BadInput

from . import byo_fixtures as F

pytest.importorskip("peft")
pytest.importorskip("pandas")


cfg, quiet, _stop_at = F.train_cfg, F.quiet, F.stop_at


def _main(capsys, command, *argv):
    try:
        rc = cli.main([command, *argv, "--no-progress"])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err.strip()


def _files(root) -> dict[str, str]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read().hex()
    return out



# ---- 1. --overwrite never deletes what it did not write ------------------------------------------------------
def test_overwrite_refuses_a_foreign_directory_holding_our_output_names(fx, tmp_path, capsys):
    user = tmp_path / "userproj"
    for rel, text in {"checkpoint/my_model_epoch37.pt": "weeks of training", "merged/pytorch_model.bin": "mine",
                      "adapter/notes.txt": "mine", "notes.txt": "keep me"}.items():
        (user / rel).parent.mkdir(parents=True, exist_ok=True)
        (user / rel).write_text(text)
    before = _files(user)
    rc, err = _main(capsys, "train", "--model", fx["bert"], "--data", fx["csv"], "--method", "lora", "--steps", "1",
                    "--batch-size", "8", "--out", str(user), "--overwrite")
    assert rc == 2 and err.startswith("lora-kernels train: error: --out:") and len(err.splitlines()) == 1
    assert "checkpoint/" in err and "merged/" in err and "adapter/" in err and "notes.txt" not in err
    assert _files(user) == before                      # nothing deleted, nothing written


def test_overwrite_of_our_own_directory_starts_over(fx, tmp_path):
    out = tmp_path / "o"
    T.run(cfg(fx, out), log=quiet)
    (out / "ranks.png").write_text("a previous run's plot")      # one of our names, not written by a lora run
    (out / "mine.txt").write_text("the user's")
    T.run(cfg(fx, out, overwrite=True), log=quiet)
    assert not (out / "ranks.png").exists()                      # ours: cleared
    assert (out / "mine.txt").read_text() == "the user's"        # not ours: kept
    assert (out / "adapter_model.safetensors").exists()


# ---- 2. non-finite losses / weights -------------------------------------------------------------------------
def test_nan_in_the_base_weights_is_refused_naming_model(fx, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bert_nan"
    shutil.copytree(fx["bert"], bad)
    w = load_file(str(bad / "model.safetensors"))
    name = next(k for k in w if k.endswith("layer.1.output.dense.weight"))
    w[name][0, 0] = float("nan")
    save_file(w, str(bad / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "o"
    rc, err = _main(capsys, "train", "--model", str(bad), "--data", fx["csv"], "--method", "lora", "--steps", "2",
                    "--batch-size", "8", "--out", str(out))
    assert rc == 2 and "--model:" in err and "non-finite" in err and "layer.1.output.dense.weight" in err
    assert not out.exists()


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(fx, tmp_path, capsys):
    out = tmp_path / "o"
    rc, err = _main(capsys, "train", "--model", fx["bert"], "--data", fx["csv"], "--method", "lora", "--steps", "4",
                    "--batch-size", "8", "--out", str(out), "--lr", "1e30", "--max-grad-norm", "0",
                    "--save-every", "1")
    assert rc == 1 and "TrainingDiverged" in err and len(err.splitlines()) == 1
    assert "train step 2/4: the training loss is nan" in err and "--lr" in err and "--max-grad-norm" in err
    for name in ("adapter_model.safetensors", "adapter_config.json", "metrics.json", "report.md", "merged"):
        assert not (out / name).exists(), name
    st = torch.load(out / T.CKPT_DIR / T.STATE_FILE, weights_only=True)
    assert st["step"] == 1 and all(torch.isfinite(v).all() for v in st["trainable"].values())
    assert all(v == v for v in st["losses"]["train"])            # no NaN in the saved loss history


def test_non_finite_gradient_norm_stops_before_the_step(fx, tmp_path, monkeypatch):
    real = torch.nn.utils.clip_grad_norm_
    calls = []

    def clip(params, max_norm, *a, **k):
        calls.append(1)
        norm = real(params, max_norm, *a, **k)
        return torch.tensor(float("inf")) if len(calls) == 2 else norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    with pytest.raises(T.TrainingDiverged, match="train step 2/2: the gradient norm is inf"):
        T.run(cfg(fx, tmp_path / "o"), log=quiet)
    assert not (tmp_path / "o").exists()     # no checkpoint yet: the run leaves nothing behind


# ---- 3. MoE --targets outside block 0; an error before the first checkpoint ---------------------------------
@pytest.mark.parametrize("method", ["moe-uniform", "alphalora"])
def test_moe_targets_of_block_1_only(fx, tmp_path, method):
    out = tmp_path / "o"
    targets = ["encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.value"]
    keep = {}
    m = T.run(cfg(fx, out, method, targets=targets, verify=True), log=quiet, keep=keep)
    assert m["experts_per_block"] == [0, 2]                  # default budget: 2 × the one targeted block
    if method == "alphalora":
        assert m["layer_alphas"][0] is None and m["layer_alphas"][1] > 0
    assert m["reload_max_abs_diff"] <= 1e-5
    from python_api.moe import MoELoRALinear
    layers = keep["model"].bert.encoder.layer
    assert isinstance(layers[1].attention.self.query, MoELoRALinear)
    assert layers[1].attention.self.query.num_experts == 2
    assert not isinstance(layers[0].attention.self.query, MoELoRALinear)
    assert json.load(open(out / "metrics.json"))["experts_per_block"] == [0, 2]


def test_alloc_alphalora_targets_of_block_1_only(fx, tmp_path, capsys):
    out = tmp_path / "a"
    rc, err = _main(capsys, "alloc", "--method", "alphalora", "--model", fx["bert"], "--data", fx["csv"], "--out",
                    str(out), "--targets", "encoder.layer.1.attention.self.query")
    assert rc == 0, err
    res = json.load(open(out / "alphalora_allocation.json"))
    assert res["experts"] == [0, 2] and res["alphas"][0] is None


def test_an_error_before_the_first_checkpoint_leaves_out_reusable(fx, tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError, match="killed"):
        T.run(cfg(fx, out, steps=3, save_every=50), log=quiet, after_step=_stop_at(1))
    assert not out.exists()                                   # created by the run, left empty: removed
    nested = tmp_path / "runs" / "a" / "b"                    # and the parents it created on the way
    with pytest.raises(RuntimeError, match="killed"):
        T.run(cfg(fx, nested, steps=3, save_every=50), log=quiet, after_step=_stop_at(1))
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "a").mkdir(parents=True)             # a parent the user made stays
    with pytest.raises(RuntimeError, match="killed"):
        T.run(cfg(fx, nested, steps=3, save_every=50), log=quiet, after_step=_stop_at(1))
    assert (tmp_path / "runs" / "a").is_dir() and not nested.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(RuntimeError, match="killed"):
        T.run(cfg(fx, mine, steps=3, save_every=50, overwrite=True), log=quiet, after_step=_stop_at(1))
    assert sorted(os.listdir(mine)) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="killed"):
        T.run(cfg(fx, empty, steps=3, save_every=50), log=quiet, after_step=_stop_at(1))
    assert os.listdir(empty) == []                            # the user's directory stays, without our marker
    T.prepare(cfg(fx, empty), log=quiet)                      # a corrected rerun is not refused


def test_an_error_after_a_checkpoint_keeps_the_run_resumable(fx, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="killed"):
        T.run(cfg(fx, out, steps=3, save_every=1), log=quiet, after_step=_stop_at(2))
    assert (out / T.MARKER).exists() and (out / T.CKPT_DIR / T.STATE_FILE).exists()
    T.run(cfg(fx, out, steps=3, save_every=1, resume=True), log=quiet)


# ---- 4. --resume after the data changed ----------------------------------------------------------------------
def test_resume_refuses_changed_data_and_accepts_an_old_marker(fx, tmp_path):
    data, ev = tmp_path / "d.csv", tmp_path / "ev.csv"
    F.write_csv(str(data), n=48, seed=1)
    F.write_csv(str(ev), n=16, seed=2)
    out = tmp_path / "o"
    c = dict(data=str(data), eval_data=str(ev), steps=3, save_every=1)
    with pytest.raises(RuntimeError, match="killed"):
        T.run(cfg(fx, out, **c), log=quiet, after_step=_stop_at(2))
    marker = json.load(open(out / T.MARKER))
    assert len(marker["data_sha256"]) == 64 and len(marker["eval_data_sha256"]) == 64
    original = data.read_text()
    data.write_text(original.replace(",pos", ",tmp").replace(",neg", ",pos").replace(",tmp", ",neg"))
    with pytest.raises(BadInput, match=r"^--data: .*d\.csv changed since the checkpoint"):
        T.run(cfg(fx, out, resume=True, **c), log=quiet)
    data.write_text(original)
    ev_original = ev.read_text()
    ev.write_text(ev_original + "a good film,pos\n")
    with pytest.raises(BadInput, match=r"^--eval-data: .*ev\.csv changed since the checkpoint"):
        T.run(cfg(fx, out, resume=True, **c), log=quiet)
    ev.write_text(ev_original)
    for key in ("data_sha256", "eval_data_sha256"):           # a marker from before the hashes: not checked
        del marker[key]
    with open(out / T.MARKER, "w") as f:
        json.dump(marker, f)
    m = T.run(cfg(fx, out, resume=True, **c), log=quiet)
    assert len(m["losses"]["train"]) == 3


def test_data_hash_of_a_datasets_directory(tmp_path):
    d = tmp_path / "ds"
    (d / "train").mkdir(parents=True)
    (d / "train" / "data.arrow").write_bytes(b"abc")
    h = T.file_sha256(str(d))
    assert h == T.file_sha256(str(d))
    (d / "train" / "data.arrow").write_bytes(b"abd")
    assert T.file_sha256(str(d)) != h
    # what load_from_disk never reads (a dangling lock link, a pipe) is left out: no error, no blocking read
    h = T.file_sha256(str(d))
    os.symlink("/nonexistent/lock", d / "train" / "stale.lock")
    os.mkfifo(d / "train" / "pipe")
    assert T.file_sha256(str(d)) == h


def test_alloc_does_not_hash_the_data(fx, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(T, "file_sha256", lambda p: seen.append(p) or "x")
    P = T.prepare(cfg(fx, tmp_path / "o"), log=quiet, check_output=False)
    assert seen == [] and P["ident"]["data_sha256"] is None
    T.prepare(cfg(fx, tmp_path / "o"), log=quiet)
    assert seen == [fx["csv"]]


# ---- 5. a .txt --eval-data next to a table whose text column is not `text` -----------------------------------
def test_txt_eval_data_with_a_table_of_another_text_column(fx, tmp_path):
    table = tmp_path / "lm.csv"
    table.write_text("sentence\n" + "".join(s + "\n" for s, _ in F.sentences(40, seed=3)))
    n_eval = sum(1 for ln in open(fx["txt"]) if ln.strip())
    P = T.prepare(cfg(fx, tmp_path / "o", model="llama", data=str(table), eval_data=fx["txt"]), log=quiet)
    assert P["cfg"].text_column == "sentence" and len(P["splits"]["test"]) == n_eval
    # --text-column given: applied to --data, and not to a .txt file (its one column is `text`)
    P = T.prepare(cfg(fx, tmp_path / "o", model="llama", data=str(table), eval_data=fx["txt"],
                      text_column="sentence"), log=quiet)
    assert len(P["splits"]["test"]) == n_eval
    # ... but still to a table
    ev = tmp_path / "ev.csv"
    ev.write_text("text\ngood film\nbad plot\n")
    with pytest.raises(BadInput, match=r"^--eval-data: .*no column 'sentence' \(--text-column\)"):
        T.prepare(cfg(fx, tmp_path / "o", model="llama", data=str(table), eval_data=str(ev),
                      text_column="sentence"), log=quiet)
    # not given: the table resolves its own text column
    P = T.prepare(cfg(fx, tmp_path / "o", model="llama", data=str(table), eval_data=str(ev)), log=quiet)
    assert P["splits"]["test"].texts == ["good film", "bad plot"]


def test_eval_table_uses_the_training_files_columns_where_it_has_them(fx, tmp_path):
    # --data resolved to "sentence"; the evaluation table holds "sentence" and an unrelated "text": not given
    # --text-column, it is evaluated on "sentence" (its own default would be "text")
    table = tmp_path / "train.csv"
    table.write_text("sentence,label\n" + "".join(f"{s},{y}\n" for s, y in F.sentences(40, seed=3)))
    ev = tmp_path / "ev.csv"
    ev.write_text("id,text,sentence,label\n1,raw html 1,good film,pos\n2,raw html 2,bad plot,neg\n")
    P = T.prepare(cfg(fx, tmp_path / "o", data=str(table), eval_data=str(ev)), log=quiet)
    assert P["cfg"].text_column == "sentence"
    assert P["splits"]["test"].texts == ["good film", "bad plot"]


def test_txt_eval_data_for_classification_says_it_has_no_labels(fx, tmp_path):
    with pytest.raises(BadInput, match=r"^--eval-data: .*\.txt file holds text only, no labels"):
        T.prepare(cfg(fx, tmp_path / "o", eval_data=fx["txt"]), log=quiet)


# ---- 6. alloc --out over a user's files ---------------------------------------------------------------------
def test_alloc_refuses_to_overwrite_files_without_overwrite(fx, tmp_path, capsys):
    out = tmp_path / "userdir"
    out.mkdir()
    (out / "alphalora_allocation.json").write_text("my notes")
    (out / "other.txt").write_text("mine")
    args = ["--method", "alphalora", "--model", fx["bert"], "--data", fx["csv"], "--out", str(out)]
    rc, err = _main(capsys, "alloc", *args)
    assert rc == 2 and "--out:" in err and "alphalora_allocation.json" in err and "--overwrite" in err
    assert (out / "alphalora_allocation.json").read_text() == "my notes" and sorted(os.listdir(out)) == [
        "alphalora_allocation.json", "other.txt"]
    rc, err = _main(capsys, "alloc", *args, "--overwrite")
    assert rc == 0, err
    assert sum(json.load(open(out / "alphalora_allocation.json"))["experts"]) == 4
    assert (out / "other.txt").read_text() == "mine"


# ---- 7. a damaged checkpoint ---------------------------------------------------------------------------------
def test_damaged_checkpoint_names_the_file(fx, tmp_path, capsys):
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="killed"):
        T.run(cfg(fx, out, steps=3, save_every=1), log=quiet, after_step=_stop_at(2))
    state = out / T.CKPT_DIR / T.STATE_FILE
    with open(state, "r+b") as f:
        f.truncate(100)
    rc, err = _main(capsys, "train", "--model", fx["bert"], "--data", fx["csv"], "--method", "lora", "--steps", "3",
                    "--batch-size", "8", "--save-every", "1", "--out", str(out), "--resume")
    assert rc == 2 and len(err.splitlines()) == 1
    assert "--resume:" in err and str(state) in err and "--overwrite" in err
    assert state.stat().st_size == 100                       # left as it was


def test_unreadable_checkpoint_is_not_called_damaged(fx, tmp_path, capsys, monkeypatch):
    # a checkpoint that cannot be read (permissions, an I/O error) is not damaged: --overwrite would throw it away
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="killed"):
        T.run(cfg(fx, out, steps=3, save_every=1), log=quiet, after_step=_stop_at(2))
    state = out / T.CKPT_DIR / T.STATE_FILE
    before = state.read_bytes()

    def denied(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(T.torch, "load", denied)
    rc, err = _main(capsys, "train", "--model", fx["bert"], "--data", fx["csv"], "--method", "lora", "--steps", "3",
                    "--batch-size", "8", "--save-every", "1", "--out", str(out), "--resume")
    assert rc == 2 and len(err.splitlines()) == 1
    assert "--resume:" in err and str(state) in err and "Permission denied" in err
    assert "--overwrite" not in err and "damaged" not in err
    assert state.read_bytes() == before
