"""bench/bench_gpu.py on CPU: every family function runs at tiny sizes with a one-call timer and returns well-formed
rows, so the one GPU call of bench/gpu_suite.sh does not meet untested code. Backends that cannot run here (cuda;
triton without TRITON_INTERPRET) must become error rows, never an exception."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bench import bench_gpu
from bench.harness import SCHEMA
from tests.helpers import TOLERANCES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "training": {"T": 64, "d": 32, "r": 4},
    "token_gate": {"T": 64, "d": 32, "r": 4},
    "masked": {"T": 64, "d": 32, "configs": ((8, 2), (8, 8))},
    "decode": {"d": 32, "r": 4, "tokens": (1, 4)},
    "sensitivity": {"layers": 2, "d": 32, "ffn": 48, "r": 4},
    "share": {"L": 3, "T": 32, "d": 32, "r": 4},
    "moe": {"T": 64, "d": 32, "E": 3, "r": 2, "top_k": 2},
    "alpha": {"configs": (("tiny", 2, 24, 40),)},
}

# family: (op, providers that must produce timed rows on CPU, extras every timed row of the op carries)
EXPECT = {
    "training": ("lora_linear", {"nn.Linear", "eager_lora(peft-like)", "lora_kernels"},
                 ("overhead_vs_linear", "tflops", "pct_of_peak")),
    "token_gate": ("lora_linear_token_gate", {"nn.Linear", "autograd-composite", "lora_kernels"},
                   ("overhead_vs_linear", "ratio_vs_composite", "tflops", "pct_of_peak")),
    "masked": ("lora_linear_masked", {"lora_kernels"}, ("ratio_vs_dense_rank_k",)),
    "decode": ("lora_linear_decode", {"torch"}, ("gbps", "pct_of_peak")),
    "sensitivity": ("sensitivity_update", {"peft-style-loop", "fused_sensitivity_update[torch]", "kernel[torch]",
                                           "SensitivityTracker.update(auto)"},
                    ("gbps", "pct_of_peak", "speedup_vs_peer", "rel_err_vs_peer", "bytes")),
    "share": ("shared_a_grad_accumulation", {"inplace", "autograd"}, ("ratio_vs_autograd", "rel_err_vs_autograd")),
    "moe": ("moe_lora_linear", {"moe-gated-op", "moe-python-loop", "plain-lora-r6", "nn.Linear-frozen"},
            ("overhead_vs_linear", "ratio_vs_python_loop")),
    "alpha": ("layer_alphas", {"layer_alphas[gram-fp64]", "layer_alphas[svd-fp32]",
                               "svdvals+python-loop-hill(weightwatcher-like)", "torch.svdvals-only(batched-fp32)"},
              ("speedup_vs_peer", "max_abs_alpha_diff_vs_peer", "matrices")),
}


def one_call_timer(fn):
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return ms, ms, ms


def _check_rows(name, rows):
    op, required, extras = EXPECT[name]
    assert rows, f"{name}: no rows"
    timed = [r for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            assert {"op", "provider", "shape", "error"} <= set(r) and r["error"], r
            continue
        assert set(SCHEMA) <= set(r), f"{name}: missing {set(SCHEMA) - set(r)}"
        assert r["median"] > 0 and r["p20"] > 0 and r["p80"] > 0 and r["unit"] == "ms", r
        assert r["device"] == "cpu"
        json.dumps(r)  # serialisable as written by write_results
        if r["op"] == op:
            missing = [k for k in extras if k not in r]
            assert not missing, f"{name}/{r['provider']}: extras {missing} missing"
    got = {r["provider"] for r in timed if r["op"] == op}
    errors = {r["provider"]: r["error"] for r in rows if "error" in r and r["provider"] in required}
    assert required <= got, f"{name}: providers {required - got} gave no timed row; errors: {errors}"
    return timed


@pytest.mark.parametrize("name", list(bench_gpu.FAMILIES))
def test_family_runs_on_cpu(name):
    fn, _ = bench_gpu.FAMILIES[name]
    rows = fn("cpu", timer=one_call_timer, card="cpu", **TINY[name])
    timed = _check_rows(name, rows)
    by = {r["provider"]: r for r in timed}
    if name == "training":
        assert by["nn.Linear"]["overhead_vs_linear"] == 0.0
        assert by["lora_kernels"]["backend"] == "cpu"   # the gated op's CPU backend
    if name == "sensitivity":
        # one step from zero state vs the PEFT-style loop: the same fp32 arithmetic
        rtol = TOLERANCES[torch.float32][1]
        for p in ("fused_sensitivity_update[torch]", "kernel[torch]", "SensitivityTracker.update(auto)"):
            assert by[p]["rel_err_vs_peer"] <= rtol, (p, by[p]["rel_err_vs_peer"])
        assert "fused_sensitivity_update[cuda]" not in by  # no CUDA here: an error row instead
        assert any(r.get("provider") == "fused_sensitivity_update[cuda]" and "error" in r for r in rows)
    if name == "share":
        # fp32 accumulation of bf16 per-layer products in either path
        assert all(r["rel_err_vs_autograd"] <= TOLERANCES[torch.bfloat16][1] for r in timed), timed
        assert {r["shape"].rsplit("-", 2)[-1] for r in timed} == {"dx"}
    if name == "alpha":
        assert by["layer_alphas[gram-fp64]"]["matrices"] == 14
        # the peer implements the same faithful-window fit: same alphas up to the eigenvalue rounding
        assert by["layer_alphas[gram-fp64]"]["max_abs_alpha_diff_vs_peer"] < 1e-3
        assert by["layer_alphas[svd-fp32]"]["max_abs_alpha_diff_vs_peer"] < 1e-3


def test_failing_provider_becomes_error_row():
    calls = []

    def flaky_timer(fn):
        calls.append(fn)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return one_call_timer(fn)
    rows = bench_gpu.bench_moe("cpu", timer=flaky_timer, card="cpu", **TINY["moe"])
    errs = [r for r in rows if "error" in r]
    assert len(errs) == 1 and "boom" in errs[0]["error"]
    assert len([r for r in rows if "median" in r]) == 3


def test_run_suite_writes_both_files(tmp_path):
    only = ["token_gate", "sensitivity"]
    sizes = {k: TINY[k] for k in only}
    out = tmp_path / "out"
    rows = bench_gpu.run_suite("cpu", "cpu test/card", only=only, timer=one_call_timer, sizes=sizes,
                               results_dir=str(tmp_path / "res"), out_dir=str(out), log=lambda s: None)
    assert rows["gated"] and rows["kernels"]
    for stem in ("gated_gpu_cpu_test_card", "kernels_gpu_cpu_test_card"):
        for ext in (".json", ".csv"):
            assert (out / (stem + ext)).exists() and (tmp_path / "res" / (stem + ext)).exists()
    data = json.loads((out / "kernels_gpu_cpu_test_card.json").read_text())
    assert data["meta"]["card"] == "cpu test/card" and set(data["meta"]["family_seconds"]) == set(only)
    assert all(r["op"] == "sensitivity_update" for r in data["rows"])


def test_run_suite_budget_and_family_failure(tmp_path):
    def broken(device, card="", timer=None):
        time.sleep(0.2)
        raise ValueError("family exploded")
    fams = dict(bench_gpu.FAMILIES)
    try:
        bench_gpu.FAMILIES["broken"] = (broken, "kernels")
        rows = bench_gpu.run_suite("cpu", "cpu", only=["broken", "alpha"], timer=one_call_timer,
                                   results_dir=str(tmp_path), budget_s=0.1, log=lambda s: None)
    finally:
        bench_gpu.FAMILIES.clear()
        bench_gpu.FAMILIES.update(fams)
    errs = [r["error"] for r in rows["kernels"]]
    assert "family exploded" in errs[0] and "skipped" in errs[1], errs


def test_cli_without_cuda_exits_cleanly():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-m", "bench.bench_gpu", "--only", "training"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "no CUDA device" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_summary_table_and_verdict(tmp_path):
    """gpu_summary reads what run_suite wrote: one row per docs/PERFORMANCE.md §4 target, exit 0 with no
    correctness failure; a provider that raised (not a budget skip) or a kernel off its peer makes it exit 1."""
    from bench import gpu_summary
    only = ["training", "masked", "decode", "sensitivity"]
    bench_gpu.run_suite("cpu", "cpu card", only=only, timer=one_call_timer, sizes={k: TINY[k] for k in only},
                        results_dir=str(tmp_path), log=lambda s: None)
    # on CPU the triton/cuda decode providers cannot run (BackendUnavailable rows); on a GPU those are failures
    rows = [r for r in gpu_summary._rows(str(tmp_path)) if "BackendUnavailable" not in r.get("error", "")]
    table = gpu_summary.render(rows)
    assert len(table.splitlines()) == 2 + 5 and "fused overhead" in table and "sensitivity update" in table
    assert [t[2] for t in gpu_summary.targets(rows)][:4].count("no result") == 0, table
    assert gpu_summary.correctness_failures(rows) == []
    bad = rows + [{"op": "lora_linear", "provider": "x", "error": "RuntimeError: boom"},
                  {"op": "sensitivity_update", "provider": "kernel[cuda]", "rel_err_vs_peer": 0.5}]
    assert len(gpu_summary.correctness_failures(bad)) == 2
    assert gpu_summary.correctness_failures([{"op": "a", "error": "skipped: suite time budget"}]) == []
    assert gpu_summary.main([str(tmp_path / "empty")]) == 1    # nothing ran is not a pass
