"""bench.report builds RESULTS.md and its pictures from a results folder (synthetic files, no benchmark run)."""
import json
import os

import pytest

pytest.importorskip("matplotlib")

from bench import report  # noqa: E402
from bench.bench_accuracy import aggregate  # noqa: E402


def _write(d, name, rows, meta=None):
    with open(os.path.join(d, name), "w") as f:
        json.dump({"meta": meta or {}, "rows": rows}, f)


def _gated_rows():
    rows = []
    for T in (256, 512, 1024):
        for prov, ms in (("peft", 2.0), ("lora_kernels", 1.5)):
            rows.append({"op": "lora_linear", "provider": prov, "mode": "full", "shape": f"T{T}-d64-r8",
                         "dtype": "float32", "device": "cpu", "median": ms * T / 256, "p20": 1.0, "p80": 3.0,
                         "unit": "ms", "ratio_vs_peft": 0.75 if prov == "lora_kernels" else 1.0})
    return rows


def _accuracy_rows():
    cfg = {"steps": 3, "batch": 4, "n_test": 8, "bf16": False}
    ranks = {f"bert.encoder.layer.{i}.attention.self.{t}": r for i in range(2) for t, r in (("query", 3), ("value", 5))}
    runs = []
    for seed, acc in ((0, 0.70), (1, 0.74), (2, 0.72)):
        base = {"seed": seed, "train_time_s": 1.0, "alloc_time_s": 0.0, "trainable_params": 100,
                "allocated_params": 100}
        runs.append({**base, "method": "lora", "acc": acc})
        runs.append({**base, "method": "shaplora", "acc": acc + 0.01, "ranks": ranks,
                     "shapley": {n: [0.1, -0.05, None, 0.2] for n in ranks}})
        runs.append({**base, "method": "shareAB", "acc": acc - 0.02, "trainable_params": 30})
        runs.append({**base, "method": "moe_uniform", "acc": acc - 0.01, "experts": [2, 2, 2]})
        runs.append({**base, "method": "alphalora", "acc": acc, "experts": [1, 2, 3], "alphas": [2.1, 2.5, 3.0]})
    return aggregate(runs, cfg, threads=1)


def test_aggregate_mean_std_and_percentiles():
    rows = {r["provider"]: r for r in _accuracy_rows()}
    lora = rows["lora"]
    assert lora["op"] == "accuracy" and lora["unit"] == "accuracy" and lora["group"] == "rank"
    assert lora["seeds"] == [0, 1, 2] and lora["accs"] == [0.70, 0.74, 0.72]
    assert lora["acc_mean"] == pytest.approx(0.72) and lora["acc_std"] == pytest.approx(0.02)
    assert (lora["p20"], lora["median"], lora["p80"]) == (0.70, 0.72, 0.74)
    assert rows["alphalora"]["experts"] == [1, 2, 3] and rows["shaplora"]["ranks"]


def test_report_builds_from_synthetic_results(tmp_path):
    res, out = tmp_path / "results", tmp_path / "out"
    res.mkdir()
    out.mkdir()
    _write(res, "gated_cpu.json", _gated_rows(), {"threads": 2})
    _write(res, "gated_cpu_quick.json", _gated_rows())          # quick files stay out of the report
    _write(res, "accuracy_cpu.json", _accuracy_rows(), {"threads": 2})
    alloc = [{**r, "op": "update_and_allocate", "shape": r["shape"].replace("T", "BERT-L")} for r in _gated_rows()]
    _write(res, "alloc_cpu.json", alloc)                        # its scaling plot is named alloc_*.png
    text = report.build(results=str(res), out_dir=str(out))
    assert (out / "RESULTS.md").read_text() == text
    assert "gated_cpu_quick.json" not in text
    assert "No result file yet." in text                         # e.g. the GPU section
    assert "| lora | 0.7200 ± 0.0200 | 3 |" in text               # every figure comes from the file
    assert "| shaplora | 0.7300 ± 0.0200 | 3 |" in text and "+0.0100" in text
    images = [line for line in text.splitlines() if line.startswith("![")]
    assert len(images) == len(set(images))                      # no picture shown twice
    plots = sorted(os.listdir(out / "plots"))
    for want in ("gated_cpu.png", "gated_cpu_scaling_lora_linear_full_T.png", "accuracy_cpu_bars.png",
                 "accuracy_cpu_ranks_shaplora.png", "accuracy_cpu_shapley.png", "accuracy_cpu_experts.png"):
        assert want in plots
        assert f"plots/{want}" in text


def _memory_rows():
    rows = []
    for prov, params, peak in (("lora", 1000, 3 * 2**20), ("shareAB", 100, 2 * 2**20)):
        for op, v, unit in (("trainable_params", params, "params"), ("optimizer_state", 8 * params, "bytes"),
                            ("peak_train_bytes", peak, "bytes")):
            rows.append({"op": op, "provider": prov, "mode": "train", "shape": "minilm", "median": v, "p20": v,
                         "p80": v, "unit": unit})
    return rows


def test_share_group_borrows_the_lora_baseline_and_memory_section(tmp_path):
    res, out = tmp_path / "results", tmp_path / "out"
    res.mkdir()
    out.mkdir()
    _write(res, "accuracy_cpu.json", _accuracy_rows())
    _write(res, "memory_cpu.json", _memory_rows())
    text = report.build(results=str(res), out_dir=str(out))
    share = text.split("**share**", 1)[1].split("**", 1)[0]
    assert "| lora | 0.7200" in share and "| shareAB | 0.7000" in share and "-0.0200" in share
    assert "| lora | 1000 | 0.01 |  |  | 3.00 |" in text and "| shareAB | 100 | 0.00 |  |  | 2.00 |" in text
    assert "plots/memory_cpu_peak.png" in text and (out / "plots" / "memory_cpu_peak.png").exists()


def test_scaling_series_needs_one_varying_size():
    series = report.scaling_series(_gated_rows())
    assert list(series) == [("lora_linear", "full", "T")]
    assert series[("lora_linear", "full", "T")]["peft"] == [(256, 2.0), (512, 4.0), (1024, 8.0)]


def test_goals_table_reports_met_missed_and_not_measured(tmp_path):
    import json

    from bench import report
    rows = [{"op": "train_step", "provider": "ours", "ratio_vs_peft": 0.8, "ratio_vs_floor": 1.3,
             "peak_ratio_vs_peft": 0.95, "median": 1.0}]
    (tmp_path / "step_cpu_x.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    lines = report.goals_md(str(tmp_path))
    assert len(lines) == 2 + 7
    assert "| whole step, ours / PEFT | <= 0.85 | 0.80 | met |" in lines
    assert "| whole step, ours / floor | <= 1.10 | 1.30 | missed |" in lines
    assert sum("not measured" in line for line in lines) == 4
