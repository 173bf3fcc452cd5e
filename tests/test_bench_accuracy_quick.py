"""The accuracy suite's CI-sized variant end to end (real MiniLM-L6 + Rotten Tomatoes, a few steps): every group
and method runs, resumes from its runs file, and the aggregate rows carry what the report draws."""
import json
import os

import pytest

pytest.importorskip("transformers")

from bench import bench_accuracy  # noqa: E402


def test_accuracy_quick_suite_runs_every_method_and_resumes(tmp_path):
    groups = list(bench_accuracy.GROUPS)                               # the default suite and the PEFT peers
    rows = bench_accuracy.run(quick=True, groups=groups, directory=str(tmp_path))
    by = {r["provider"]: r for r in rows}
    want = [m for ms in bench_accuracy.GROUPS.values() for m in ms]
    assert sorted(by) == sorted(set(want))
    for r in rows:
        assert r["n_seeds"] == len(bench_accuracy.QUICK["seeds"]) and 0.0 <= r["acc_mean"] <= 1.0
        assert r["unit"] == "accuracy" and r["trainable_params"] > 0
    # equal budgets where the issue asks for them
    assert by["shareAB"]["trainable_params"] < by["shareA"]["trainable_params"] < by["lora"]["trainable_params"]
    assert sum(by["alphalora"]["experts"]) == sum(by["moe_uniform"]["experts"]) == sum(by["mola_2468"]["experts"])
    assert len(by["alphalora"]["alphas"]) == len(by["alphalora"]["experts"])
    assert by["shaplora"]["ranks"] and by["shaplora"]["shapley"] and by["adalora"]["ranks"]
    assert sum(by["shaplora"]["ranks"].values()) <= bench_accuracy.QUICK["r"] * len(by["shaplora"]["ranks"])
    runs = tmp_path / "accuracy_cpu_quick_runs.jsonl"
    n = len(runs.read_text().splitlines())
    assert n == len(set(want)) * len(bench_accuracy.QUICK["seeds"])
    assert by["peft_lora"]["trainable_params"] == by["lora"]["trainable_params"]      # same budget as the peer
    assert sum(by["peft_adalora"]["ranks"].values()) <= bench_accuracy.QUICK["r"] * len(by["peft_adalora"]["ranks"])
    # every (method, seed) is done: a rerun trains nothing and gives the same rows
    again = bench_accuracy.run(quick=True, groups=groups, directory=str(tmp_path))
    assert len(runs.read_text().splitlines()) == n
    assert [r["acc_mean"] for r in again] == [r["acc_mean"] for r in rows]
    with open(os.path.join(tmp_path, "accuracy_cpu_quick.json")) as f:
        assert json.load(f)["meta"]["quick"] is True
