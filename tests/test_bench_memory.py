"""bench.harness.peak_alloc_bytes on a known allocation pattern, and the quick memory benchmark's rows."""
import json
import os

import pytest
import torch

from bench import bench_memory
from bench.harness import peak_alloc_bytes

MB = 1 << 20


def test_peak_alloc_bytes_known_pattern():
    kept = []

    def fn():
        a = torch.empty(MB, dtype=torch.uint8).fill_(1)      # 1 MiB
        b = torch.empty(2 * MB, dtype=torch.uint8).fill_(1)  # 2 MiB: peak 3 MiB
        del a
        c = torch.empty(MB // 2, dtype=torch.uint8)          # 0.5 MiB reuses none of the peak
        kept.extend([b, c])

    got = peak_alloc_bytes(fn)
    assert abs(got["peak"] - 3 * MB) <= 4096, got
    assert abs(got["end"] - (2 * MB + MB // 2)) <= 4096, got


def test_peak_alloc_bytes_nothing_allocated():
    x = torch.ones(8)
    got = peak_alloc_bytes(x.zero_)
    assert got == {"peak": 0, "end": 0}


def test_storage_bytes_dedups_shared_storage():
    t = torch.zeros(10, 4)
    assert bench_memory.storage_bytes([t, t[1:], t.view(-1), torch.zeros(3)]) == 160 + 12
    assert bench_memory.storage_bytes([t, torch.zeros(3)], exclude=[t[2]]) == 12


def test_quick_run_rows(tmp_path):
    from python_api.app.data import AssetMissing
    try:
        rows = bench_memory.run(quick=True, directory=str(tmp_path))
    except AssetMissing as e:
        pytest.skip(f"offline model or data missing: {e}")
    assert os.path.exists(tmp_path / "memory_cpu_quick.csv")
    with open(tmp_path / "memory_cpu_quick.json") as f:
        assert json.load(f)["rows"] == rows
    v = {(r["op"], r["provider"]): r["median"] for r in rows}
    methods = {r["provider"] for r in rows}
    assert set(bench_memory.QUICK_METHODS) <= methods
    tp = {m: v["trainable_params", m] for m in methods}
    assert tp["shareAB"] < tp["shareA"] < tp["lora"]
    assert tp["peft_lora"] == tp["lora"]          # same targets, same rank, same head
    assert tp["head_only"] < tp["lora"]
    for m in methods:
        # AdamW keeps exp_avg and exp_avg_sq (fp32) per trainable scalar; step counters are left out
        assert v["optimizer_state", m] == 2 * 4 * tp[m], m
        assert v["grad_bytes", m] == 4 * tp[m], m
        assert v["peak_step_bytes", m] > v["grad_bytes", m], m
        assert v["peak_train_bytes", m] > v["peak_step_bytes", m] + v["optimizer_state", m], m
    assert v["peak_step_bytes", "head_only"] < v["peak_step_bytes", "lora"]
    assert v["peak_train_bytes", "shareAB"] < v["peak_train_bytes", "lora"]
    lora_peak = next(r for r in rows if r["op"] == "peak_step_bytes" and r["provider"] == "lora")
    assert lora_peak["ratio_vs_lora"] == 1.0 and lora_peak["unit"] == "bytes" and "ratio_vs_peft_lora" in lora_peak
