"""``lora-kernels train`` on tiny local models (random BERT / Llama, hidden 32, 2 blocks) and generated data:
outputs that PEFT / load_adapters / AutoModel load with equal logits, exact resume, and bad input."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from python_api.app import cli
from python_api.app import train as T


pytest.importorskip("peft")
pytest.importorskip("pandas")


def cfg(fx, out, method="lora", model="bert", data="csv", **kw):
    # The tiny fixtures' super-networks cannot learn in a few steps: plumbing tests skip ShapLoRA's learned-check
    # (test_shaplora_refuses_a_supernet_that_did_not_learn keeps it on).
    base = dict(model=fx[model], data=fx[data], method=method, out=str(out), steps=4, batch_size=8,
                progress=False, supernet_check=False)
    base.update(kw)
    return T.TrainConfig(**base)


def quiet(*a, **k):
    pass


def base_model(fx, name="bert", task="classify", seed=0):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if task == "classify":
        return AutoModelForSequenceClassification.from_pretrained(fx[name], num_labels=2).eval()
    return AutoModelForCausalLM.from_pretrained(fx[name]).eval()


def probe(fx, name="bert"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fx[name])
    return dict(tok(["the film was good and fine", "bad plot and a dull cast", "it was grim"],
                    return_tensors="pt", padding=True))


@torch.no_grad()
def logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def tensors(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "adapter_model.safetensors"))


# ---- outputs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "adalora", "shaplora"])
def test_peft_methods_load_in_peft_with_equal_outputs(fx, tmp_path, method):
    from peft import PeftModel

    keep = {}
    m = T.run(cfg(fx, tmp_path / "o", method), log=quiet, keep=keep)
    b = probe(fx)
    ours = logits(keep["model"], b)
    plain = logits(base_model(fx), b)
    peft_model = PeftModel.from_pretrained(base_model(fx, seed=123), str(tmp_path / "o")).eval()
    theirs = logits(peft_model, b)
    assert (theirs - ours).abs().max() <= 1e-5
    assert (plain - ours).abs().max() > 1e-4          # the adapters and the head changed something
    # trainable_params counts active ranks only: what the PEFT file holds (A, B of kept ranks + head) plus, in
    # SVD form (adalora; shaplora retrains plain LoRA), one λ per kept rank (PEFT's file has λ folded into B)
    cfg_json = json.load(open(tmp_path / "o" / "adapter_config.json"))
    kept = sum(cfg_json["rank_pattern"].values()) if method == "adalora" else 0
    assert m["trainable_params"] == sum(t.numel() for t in tensors(tmp_path / "o").values()) + kept
    assert cfg_json["modules_to_save"] == ["classifier"]
    if method != "lora":
        ranks = cfg_json["rank_pattern"]
        assert sum(ranks.values()) == 8 * 12          # default budget r × modules, after the final mask
        assert m["ranks"] and sum(m["ranks"].values()) == 8 * 12
    if method == "shaplora":
        assert -1.0 <= m["score_stability"] <= 1.0
    for name in ("metrics.json", "report.md", "loss.png"):
        assert (tmp_path / "o" / name).exists()
    for key in ("method", "task", "trainable_params", "test_accuracy", "train_seconds", "allocation_seconds",
                "steps", "seed", "config"):
        assert key in m
    assert m["peft_reload_max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("method", ["adalora", "shaplora"])
def test_parameter_budget(fx, tmp_path, method):
    """--budget-unit params: the kept ranks' trainable parameters fit the budget (default: uniform LoRA's at --r)
    and miss it by less than one rank; ShapLoRA retrains plain LoRA (no λ)."""
    keep = {}
    m = T.run(cfg(fx, tmp_path / "o", method, budget_unit="params"), log=quiet, keep=keep)
    import python_api as lk
    layers = lk.adapter_layers(keep["model"])
    per_rank = {n: lay.in_features + lay.out_features + (method == "adalora") for n, lay in layers.items()}
    spent = sum(per_rank[n] * k for n, k in m["ranks"].items())
    lora = T.run(cfg(fx, tmp_path / "l", "lora"), log=quiet)
    head = m["trainable_params"] - spent
    budget = lora["trainable_params"] - head                       # uniform LoRA's adapter parameters at r = 8
    assert budget - max(per_rank.values()) < spent <= budget
    assert not any(lay.svd for lay in layers.values()) if method == "shaplora" else all(
        lay.svd for lay in layers.values())
    assert json.load(open(tmp_path / "o" / T.MARKER))["budget_unit"] == "params"


@pytest.mark.parametrize("argv, match", [
    (["--method", "lora", "--budget-unit", "params"], "--budget-unit"),
    (["--method", "shaplora", "--budget-unit", "params", "--budget", "3"], "--budget"),
    (["--method", "lora", "--retrain", "warm"], "--retrain"),
    (["--method", "adalora", "--budget-unit", "params", "--budget", "10000000"], "--budget")])
def test_parameter_budget_refused_before_training(fx, tmp_path, capsys, argv, match):
    rc = cli.main(["train", "--model", fx["bert"], "--data", fx["csv"], "--out", str(tmp_path / "o"), "--steps", "2",
                   *argv])
    assert rc == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "o" / T.CKPT_DIR).exists()


@pytest.mark.parametrize("method", ["sharelora-a", "moe-uniform", "alphalora"])
def test_own_format_reloads_into_a_fresh_base(fx, tmp_path, method):
    import python_api as lk

    keep = {}
    m = T.run(cfg(fx, tmp_path / "o", method, merge=method == "sharelora-a"), log=quiet, keep=keep)
    b = probe(fx)
    ours = logits(keep["model"], b)
    fresh = lk.load_adapters(base_model(fx, seed=77), str(tmp_path / "o" / "adapter")).eval()
    assert torch.equal(logits(fresh, b), ours)
    assert m["format"] == "lora_kernels"
    if method == "sharelora-a":
        from transformers import AutoModelForSequenceClassification

        merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "o" / "merged")).eval()
        assert (logits(merged, b) - ours).abs().max() <= 1e-5
        # one A [8, in] per module type (in = 32 for five types, 64 for output.dense), a B [out, 8] per module
        # (out = 32 for five per block, 64 for intermediate.dense), each shared matrix stored and counted once
        want = 8 * (5 * 32 + 64) + 2 * 8 * (5 * 32 + 64)
        assert m["trainable_adapter_params"] == want
        assert sum(t.numel() for k, t in tensors(tmp_path / "o" / "adapter").items()
                   if k.endswith(("lora_A", "lora_B"))) == want
    else:
        assert sum(m["experts_per_block"]) == 4 and len(m["experts_per_block"]) == 2


def test_causal_lm_text_file(fx, tmp_path):
    from peft import PeftModel

    keep = {}
    m = T.run(cfg(fx, tmp_path / "o", "lora", model="llama", data="txt"), log=quiet, keep=keep)
    assert m["task"] == "causal-lm" and 1.0 < m["test_perplexity"] < 1e4
    b = probe(fx, "llama")
    peft_model = PeftModel.from_pretrained(base_model(fx, "llama", "causal-lm"), str(tmp_path / "o")).eval()
    assert (logits(peft_model, b) - logits(keep["model"], b)).abs().max() <= 1e-5
    report = (tmp_path / "o" / "report.md").read_text()
    assert "Generated sample" in report and "lora-kernels train" in report


def test_causal_lm_loss_counts_real_tokens_only(fx):
    model = base_model(fx, "llama", "causal-lm")
    b = probe(fx, "llama")
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    padded = T.batch_loss(model, {**b, "labels": labels}, "causal-lm")
    nll = cnt = 0.0
    for i in range(b["input_ids"].shape[0]):
        n = int(b["attention_mask"][i].sum())
        ids = b["input_ids"][i:i + 1, :n]
        one = T.batch_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids},
                           "causal-lm")
        nll += float(one.detach()) * (n - 1)
        cnt += n - 1
    assert abs(float(padded) - nll / cnt) < 1e-5
    assert int((b["attention_mask"] == 0).sum()) > 0      # the probe really has padding


# ---- resume ---------------------------------------------------------------------------------------------
def _interrupt_at(phase, k):
    def hook(ph, step):
        if ph == phase and step == k:
            signal.raise_signal(signal.SIGINT)
    return hook


@pytest.mark.parametrize("method,phase,k", [("lora", "train", 3), ("adalora", "train", 4),
                                            ("shaplora", "supernet", 2)])
def test_interrupt_and_resume_is_bit_identical(fx, tmp_path, method, phase, k):
    ref = T.run(cfg(fx, tmp_path / "ref", method, steps=6, save_every=100), log=quiet)
    with pytest.raises(T.Interrupted, match="--resume"):
        T.run(cfg(fx, tmp_path / "cut", method, steps=6, save_every=100, command="lora-kernels train x"),
              log=quiet, after_step=_interrupt_at(phase, k))
    assert (tmp_path / "cut" / "checkpoint" / "state.pt").exists()
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()
    got = T.run(cfg(fx, tmp_path / "cut", method, steps=6, save_every=100, resume=True), log=quiet)
    assert got["losses"] == ref["losses"]
    a, b = tensors(tmp_path / "ref"), tensors(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert got["test_accuracy"] == ref["test_accuracy"]


@pytest.mark.parametrize("retrain", ["plain", "warm"])
def test_shaplora_killed_between_allocation_and_retrain_resumes_exactly(fx, tmp_path, retrain):
    """A run killed after the allocation's checkpoint, before the retrain's first one, resumes to the same
    adapters: the warm start (the super-network's kept components and head) is in that checkpoint."""
    ref = T.run(cfg(fx, tmp_path / "ref", "shaplora", steps=4, save_every=100, retrain=retrain), log=quiet)

    def die(phase, step):
        if phase == "train" and step == 1:
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError, match="killed"):
        T.run(cfg(fx, tmp_path / "cut", "shaplora", steps=4, save_every=100, retrain=retrain), log=quiet,
              after_step=die)
    got = T.run(cfg(fx, tmp_path / "cut", "shaplora", steps=4, save_every=100, retrain=retrain, resume=True),
                log=quiet)
    assert got["losses"]["train"] == ref["losses"]["train"] and got["ranks"] == ref["ranks"]
    a, b = tensors(tmp_path / "ref"), tensors(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("retrain", ["plain", "warm"])
def test_shaplora_warm_retrain_starts_at_the_super_network(fx, tmp_path, monkeypatch, retrain):
    """--retrain warm: the retrain starts with the masked super-network's outputs (its kept components and head);
    plain starts afresh. Either way the written adapters load in PEFT with equal outputs."""
    from python_api.allocators import shaplora as S

    b, seen = probe(fx), {}
    real_allocate, real_phase = S.shaplora_allocate, T.Run.train_phase

    def allocate(sup, *a, **k):
        out = real_allocate(sup, *a, **k)
        seen["supernet"] = logits(sup.eval(), b)
        sup.train()
        return out

    def phase(self, name, model, *a, **k):
        if name == "train":
            seen["start"] = logits(model.eval(), b)
            model.train()
        return real_phase(self, name, model, *a, **k)
    monkeypatch.setattr(S, "shaplora_allocate", allocate)
    monkeypatch.setattr(T.Run, "train_phase", phase)
    m = T.run(cfg(fx, tmp_path / "o", "shaplora", steps=6, retrain=retrain), log=quiet)
    gap = float((seen["start"] - seen["supernet"]).abs().max())
    assert (gap <= 1e-5) if retrain == "warm" else (gap > 1e-4)
    assert m["config"]["retrain"] == retrain and m["peft_reload_max_abs_diff"] <= 1e-5


def test_killed_run_resumes_from_the_last_periodic_checkpoint(fx, tmp_path):
    ref = T.run(cfg(fx, tmp_path / "ref", "lora", steps=5), log=quiet)

    def die(phase, step):
        if step == 3:
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError, match="killed"):
        T.run(cfg(fx, tmp_path / "cut", "lora", steps=5, save_every=2), log=quiet, after_step=die)
    got = T.run(cfg(fx, tmp_path / "cut", "lora", steps=5, save_every=2, resume=True), log=quiet)
    assert got["losses"] == ref["losses"]
    a, b = tensors(tmp_path / "ref"), tensors(tmp_path / "cut")
    assert all(torch.equal(a[key], b[key]) for key in a)


# ---- the command line and bad input ---------------------------------------------------------------------
def _main(capsys, *argv):
    try:
        rc = cli.main(["train", *argv, "--no-progress"])
    except SystemExit as e:       # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err.strip()
    return rc, err


def test_cli_train_runs(fx, tmp_path, capsys):
    out = tmp_path / "o"
    rc = cli.main(["train", "--model", fx["bert"], "--data", fx["csv"], "--method", "lora", "--out", str(out),
                   "--steps", "2", "--batch-size", "8", "--no-progress", "--max-length", "4"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert printed.count("longer than --max-length 4") == 1     # reported once
    m = json.load(open(out / "metrics.json"))
    assert sum(m["truncated_texts"].values()) > 0 and m["config"]["max_length"] == 4
    assert "--max-length 4" in (out / "report.md").read_text()
    assert "splits: train 52, validation 6, test 6" in printed


def _bad_cases(fx, tmp):
    def write(name, text):
        p = os.path.join(tmp, name)
        with open(p, "w") as f:
            f.write(text)
        return p
    nodir = os.path.join(tmp, "noweights")
    os.makedirs(nodir, exist_ok=True)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        os.link(os.path.join(fx["bert"], f), os.path.join(nodir, f))
    notok = os.path.join(tmp, "notok")
    os.makedirs(notok, exist_ok=True)
    for f in ("config.json", "model.safetensors"):
        os.link(os.path.join(fx["bert"], f), os.path.join(notok, f))
    junk = write("junk.gguf", "not a gguf at all")
    bad_gguf = os.path.join(tmp, "bad.gguf")
    with open(bad_gguf, "wb") as f:
        f.write(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 40)
    csv = fx["csv"]
    return [
        (["--data", os.path.join(tmp, "missing.csv")], "no such file"),
        (["--data", write("empty.csv", "")], "file is empty"),
        (["--data", write("x.xlsx", "a,b\n")], "unknown format"),
        (["--data", csv, "--text-column", "txt"], "columns found: ['text', 'label']"),
        (["--data", csv, "--label-column", "Label"], "did you mean 'label'"),
        (["--data", write("one.csv", "text,label\na good film,pos\na fine film,pos\n")], "one class"),
        (["--data", csv, "--eval-data", write("ev.csv", "text,label\ngood,pos\nbad,meh\n")], "never occur"),
        (["--data", write("num.csv", "text,label\n1,a\n2,b\n3,a\n4,b\n")], "holds no text"),
        (["--data", write("reg.csv", "text,label\n" + "".join(f"film number {i},{i / 7:.3f}\n" for i in range(40)))],
         "looks continuous (40 distinct numeric values"),
        (["--model", nodir], "no weights"),
        (["--model", notok], "no tokenizer"),
        (["--model", junk], "not a GGUF file"),
        (["--model", bad_gguf], "cannot be loaded by transformers"),
        (["--steps", "0"], "positive integer"),
        (["--max-length", "100"], "--max-length: 100 tokens exceed the model's 64 positions"),
        (["--r", "40"], "--r: rank 40 exceeds min(in, out) = 32"),
        (["--method", "alphalora", "--budget", "1"], "--budget: 1 experts are fewer than the 2 targeted blocks"),
    ]


def test_bad_input_one_line_exit_2_nothing_written(fx, tmp_path, capsys):
    for extra, needle in _bad_cases(fx, str(tmp_path)):
        out = tmp_path / "out"
        args = ["--model", fx["bert"], "--data", fx["csv"], "--method", "lora", "--out", str(out), "--steps", "1"]
        for i in range(0, len(extra), 2):        # the case's value replaces the default of that option
            if extra[i] in args:
                args[args.index(extra[i]) + 1] = extra[i + 1]
            else:
                args += extra[i:i + 2]
        rc, err = _main(capsys, *args)
        assert rc == 2, (extra, err)
        assert needle in err, (extra, err)
        assert len(err.splitlines()) == 1, err
        assert not out.exists(), extra


def test_non_text_values_are_coerced_with_a_warning(fx, tmp_path):
    p = tmp_path / "mixed.jsonl"     # JSON keeps the number a number (a CSV cell is text already)
    p.write_text("".join(json.dumps({"text": "good film" if i % 2 else 42, "label": i % 2}) + "\n"
                         for i in range(40)))
    from python_api.app import byo_data
    with pytest.warns(UserWarning, match="non-text values in column 'text'"):
        ex, _ = byo_data.load_examples(str(p))
    assert ex.texts[0] == "42"


def test_out_dir_and_resume_guards(fx, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user file")
    common = ["--model", fx["bert"], "--data", fx["csv"], "--steps", "2", "--batch-size", "8"]
    rc, err = _main(capsys, *common, "--method", "lora", "--out", str(foreign))
    assert rc == 2 and "not written by lora-kernels train" in err and "--overwrite" in err
    assert os.listdir(foreign) == ["keep.txt"]
    rc, _ = _main(capsys, *common, "--method", "lora", "--out", str(foreign), "--overwrite")
    assert rc == 0 and (foreign / "keep.txt").read_text() == "user file"
    rc, err = _main(capsys, *common, "--method", "lora", "--out", str(foreign))
    assert rc == 2 and "--resume" in err
    rc, err = _main(capsys, *common, "--method", "adalora", "--out", str(foreign), "--resume")
    assert rc == 2 and "method 'lora'" in err
    rc, err = _main(capsys, *["--model", fx["llama"], *common[2:]], "--method", "lora", "--out", str(foreign),
                    "--resume")
    assert rc == 2 and "for model" in err
    rc, err = _main(capsys, *common, "--method", "lora", "--out", str(tmp_path / "none"), "--resume")
    assert rc == 2 and "no lora-kernels train checkpoint" in err


@pytest.mark.parametrize("method", ["shaplora", "alphalora"])
def test_alloc_on_your_own_model(fx, tmp_path, method, capsys):
    out = tmp_path / "a"
    trains = ["--steps", "2", "--batch-size", "8", "--no-supernet-check"] if method == "shaplora" else []
    rc = cli.main(["alloc", "--method", method, "--model", fx["bert"], "--data", fx["csv"], "--out", str(out),
                   "--no-progress", *trains])   # alphalora reads spectra: it trains nothing (such options refused)
    assert rc == 0
    res = json.load(open(out / f"{method}_allocation.json"))
    if method == "shaplora":
        assert sum(res["ranks"].values()) == 8 * 12
        assert -1.0 <= res["score_stability"] <= 1.0   # the library's allocation step: two scorings compared
    else:
        assert sum(res["experts"]) == 4


def test_bf16_trains_fp32_adapters(fx, tmp_path):
    keep = {}
    m = T.run(cfg(fx, tmp_path / "o", "lora", steps=2, bf16=True, verify=False), log=quiet, keep=keep)
    assert all(torch.isfinite(torch.tensor(v)).all() for v in m["losses"]["train"])
    import python_api as lk
    layer = next(iter(lk.adapter_layers(keep["model"]).values()))
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    assert layer.lora_B.abs().max() > 0     # the adapters trained


def test_shaplora_refuses_a_supernet_that_did_not_learn(fx, tmp_path, capsys):
    """Never hand noise scores to the allocator: a super-network whose validation loss did not fall 5% (here: 2
    steps on the tiny fixture) stops the run with one line saying so, before any rank is allocated."""
    out = tmp_path / "o"
    rc = cli.main(["train", "--model", fx["bert"], "--data", fx["csv"], "--method", "shaplora", "--out", str(out),
                   "--steps", "2", "--batch-size", "8", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "SupernetNotLearnedError" in err and "did not learn" in err and err.count("\n") == 1
    assert not (out / "adapter_model.safetensors").exists()


def test_default_max_length_is_lowered_to_the_model_positions(fx, tmp_path):
    # the tiny BERT has 64 positions: the classification default (128) would fail deep in the first forward
    P = T.prepare(cfg(fx, tmp_path / "o"), log=quiet, check_output=False)
    assert P["cfg"].max_length == 64 and P["ident"]["max_length"] == 64
    assert T.prepare(cfg(fx, tmp_path / "o", max_length=48), log=quiet, check_output=False)["cfg"].max_length == 48


def test_causal_lm_texts_of_one_token_are_refused(fx, tmp_path, capsys):
    """A text of one token has no next token: a run on such texts trained nothing and reported perplexity NaN."""
    short = tmp_path / "short.txt"
    short.write_text("good\n" * 20)
    out = tmp_path / "o"
    rc, err = _main(capsys, "--model", fx["llama"], "--data", str(short), "--method", "lora", "--out", str(out),
                    "--steps", "1")
    assert rc == 2 and "--data: no train text has 2 or more tokens" in err and not out.exists()
    rc, err = _main(capsys, "--model", fx["llama"], "--data", fx["txt"], "--eval-data", str(short), "--method",
                    "lora", "--out", str(out), "--steps", "1")
    assert rc == 2 and "--eval-data: no test text has 2 or more tokens" in err and not out.exists()


def test_argument_errors_point_to_the_subcommand_help(fx, tmp_path, capsys):
    rc, err = _main(capsys, "--model", fx["bert"], "--data", fx["csv"], "--steps", "0", "--out", str(tmp_path / "o"))
    assert rc == 2 and "(see lora-kernels train --help)" in err and "{command}" not in err


@pytest.mark.parametrize("method, init", [("shaplora", "lora"), ("adalora", "adalora")])
def test_shaplora_supernet_starts_as_lora_adalora_as_peft(fx, tmp_path, method, init):
    # ShapLoRA's super-network takes LoRA's init (it must learn within half the steps); AdaLoRA keeps PEFT's
    from python_api.surgery import adapter_layers

    c = cfg(fx, tmp_path / "o", method)
    model = T.adapt(base_model(fx), c, ["query", "value"], ["classifier"])
    layers = adapter_layers(model)
    assert layers and all(m.svd and m.svd_init == init for m in layers.values())
    e = torch.cat([m.lora_E.detach() for m in layers.values()])
    assert torch.equal(e, torch.ones_like(e)) if init == "lora" else torch.count_nonzero(e) == 0
