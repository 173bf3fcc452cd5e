"""The evaluation protocol's CI-sized variant end to end (real MiniLM-L6 + Rotten Tomatoes, a few steps): the
result schema, the validation curve, the single test read per run, and resuming from the runs file."""
import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from bench import bench_protocol as bp  # noqa: E402
from bench.harness import SCHEMA  # noqa: E402


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_protocol_quick_schema_and_resume(tmp_path):
    q = bp.QUICK
    rows = bp.run(quick=True, directory=str(tmp_path), mode="both")
    main = {r["provider"]: r for r in rows if r["op"] == "protocol"}
    assert sorted(main) == sorted(q["methods"])
    for r in main.values():
        assert set(SCHEMA) <= set(r) and r["unit"] == "accuracy" and r["task"] == "rotten_tomatoes"
        assert r["seeds"] == q["seeds"] and r["n_seeds"] == len(q["seeds"]) and 0.0 <= r["acc_mean"] <= 1.0
        assert r["lr"] == q["lrs"] and set(r["lr_grid_val_acc"]) == {str(lr) for lr in q["lrs"]}
        assert r["adapter_params"] > 0 and len(r["params_ratio"]) == 2 and isinstance(r["params_equal"], bool)
    lora, shap = main["lora"], main["shaplora"]
    assert lora["diff_vs_lora"] is None and lora["params_ratio"] == [1.0, 1.0] and lora["params_equal"]
    d = shap["diff_vs_lora"]
    assert d["n"] == 2 and d["seeds"] == q["seeds"] and d["lo"] <= d["mean"] <= d["hi"]
    assert d["mean"] == pytest.approx(shap["acc_mean"] - lora["acc_mean"], abs=1e-4)
    assert shap["extra_time_s"] > 0 and lora["extra_time_s"] == 0     # super-net + scoring, reported apart
    # ShapLoRA holds uniform LoRA's adapter parameters (not its ranks), short by less than one rank of the widest
    # MiniLM module (384 + 1536), so within the ±2% of the equal-parameter view
    assert lora["adapter_params"] - (384 + 1536) < shap["adapter_params"] <= lora["adapter_params"]
    assert shap["params_equal"] is True and len(shap["ranks_per_seed"]["0"]) == 36
    (c,) = [r for r in rows if r["op"] == "protocol_curve"]
    assert c["steps"] == [2, 4] and len(c["val_acc"]) == 2 and c["plateau_step"] in (2, 4, None)
    with open(tmp_path / "protocol_cpu_quick.json") as f:
        saved = json.load(f)
    assert saved["meta"]["quick"] is True and saved["meta"]["splits"]["rotten_tomatoes"]["validation"] >= 8
    assert saved["meta"]["test_reads"]["rotten_tomatoes"] == len(q["methods"]) * len(q["seeds"])
    # 1 curve, 1 tuning run per method (one lr, one tuning seed), one final run per method and seed
    runs = tmp_path / "protocol_cpu_quick_runs.jsonl"
    recs = _lines(runs)
    kinds = [r["kind"] for r in recs]
    assert kinds.count("curve") == 1 and kinds.count("tune") == 2 and kinds.count("final") == 4
    assert all("test_acc" not in r for r in recs if r["kind"] == "tune")    # tuning never reads the test split
    # a partial run resumes: drop uniform LoRA's seed-1 run; only it is redone, with the same data order and result
    (i,) = [k for k, r in enumerate(recs) if (r["kind"], r["method"], r["seed"]) == ("final", "lora", 1)]
    gone = recs[i]
    runs.write_text("".join(json.dumps(r) + "\n" for k, r in enumerate(recs) if k != i))
    again = bp.run(quick=True, directory=str(tmp_path), mode="both")
    redo = _lines(runs)
    assert len(redo) == len(recs) and (redo[-1]["method"], redo[-1]["seed"]) == ("lora", 1)
    assert redo[-1]["test_acc"] == gone["test_acc"] and redo[-1]["val_loss"] == pytest.approx(gone["val_loss"])
    with open(tmp_path / "protocol_cpu_quick.json") as f:
        assert json.load(f)["meta"]["test_reads"]["rotten_tomatoes"] == 1
    assert [r["acc_mean"] for r in again if r["op"] == "protocol"] == [r["acc_mean"] for r in main.values()]
    # a finished configuration trains nothing
    bp.run(quick=True, directory=str(tmp_path), mode="both")
    assert len(_lines(runs)) == len(recs)
    # a changed run setting is a new configuration: nothing of the old one is reused
    assert bp.config_key({**q, "steps": 5}) != bp.config_key(q) == bp.config_key({**q, "seeds": [7]})
    lines, imgs = bp.report_md("protocol_cpu_quick.json", again, str(tmp_path / "plots"))
    assert any(line.startswith("| shaplora |") for line in lines) and len(imgs) == 2
    assert all(os.path.getsize(p) > 0 for p in imgs)
    # bench/report.py renders the same section from a results folder
    from bench import report
    res = tmp_path / "results"
    res.mkdir()
    (res / "protocol_cpu.json").write_text((tmp_path / "protocol_cpu_quick.json").read_text())
    text = report.build(results=str(res), out_dir=str(tmp_path), plots=str(tmp_path / "plots2"))
    assert "| shaplora |" in text and "protocol_cpu_paired_diff.png" in text


def test_test_split_is_read_once_and_hidden_from_training():
    task = bp.ProtocolTask("rotten_tomatoes", bp.QUICK)
    view = task.view(1e-3)
    assert not hasattr(view, "test") and not hasattr(view, "_test") and view.cfg["lr"] == 1e-3
    model = task.fresh(0)
    task.test_once(model, ("lora", 0))
    with pytest.raises(RuntimeError, match="already read"):
        task.test_once(model, ("lora", 0))


def test_bad_settings_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="tasks"):
        bp.run(quick=True, directory=str(tmp_path), tasks=["imdb"])
    with pytest.raises(ValueError, match="reference"):
        bp.run(quick=True, directory=str(tmp_path), methods=["shaplora"])
    with pytest.raises(ValueError, match="unknown protocol setting"):
        bp.run(quick=True, directory=str(tmp_path), step=3)


@pytest.mark.skipif(os.environ.get("PROTOCOL_LM_TEST") != "1",
                    reason="the SmolLM2-135M task loads a 135M model from GGUF (about a minute): PROTOCOL_LM_TEST=1")
def test_protocol_lm_task_quick(tmp_path):
    pytest.importorskip("gguf")
    rows = bp.run(quick=True, directory=str(tmp_path), tasks=["bbc_news_lm"], methods=bp.LM_METHODS, seeds=[0],
                  steps=2)
    by = {r["provider"]: r for r in rows if r["op"] == "protocol"}
    assert sorted(by) == sorted(bp.LM_METHODS)
    for r in by.values():
        assert r["metric"] == "ppl" and r["unit"] == "perplexity" and 1.0 < r["ppl_mean"] < 1e4
    assert by["shareA"]["params_ratio"][0] < 1.0 and by["shaplora"]["extra_time_s"] > 0
    assert by["shaplora"]["diff_vs_lora"]["n"] == 1
