"""Acceptance test of issue #13: a pure-Python wheel of the repo, installed into a fresh target folder and run from a
folder outside the repository, runs every benchmark family through ``lora-kernels bench --quick --out DIR``; only
the GPU family may say "skipped", and only when there is no CUDA device. The results land in DIR, never inside the
installed package. The wheel build is a copy of the tree so the repo's build/ folder (stale files) stays out of it.
"""
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile

import torch

from bench import bench_gpu
from python_api.app import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# family module -> the result file its quick run writes
CPU_FAMILIES = {"bench_gated": "gated_cpu_quick", "bench_share": "share_cpu_quick", "bench_alloc": "alloc_cpu_quick",
                "bench_alpha": "alpha_cpu_quick", "bench_moe": "moe_cpu_quick", "bench_memory": "memory_cpu_quick"}
_IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".pytest_cache",
                                 ".ruff_cache", "out", "bench-results")


def _run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert p.returncode == 0, f"{cmd[:4]} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def test_cli_lists_every_family():
    assert set(CPU_FAMILIES) | {"bench_gpu", "bench_step"} == set(cli.BENCH_MODULES)


def test_gpu_quick_sizes_fit_the_family_signatures():
    """bench_gpu.run(quick=True) only runs on a GPU; its sizes must at least bind to the family functions here."""
    assert set(bench_gpu.QUICK_SIZES) == set(bench_gpu.FAMILIES)
    for name, kwargs in bench_gpu.QUICK_SIZES.items():
        inspect.signature(bench_gpu.FAMILIES[name][0]).bind("cuda", card="x", **kwargs)


def test_results_dir_follows_the_env(tmp_path, monkeypatch):
    from bench import harness
    monkeypatch.delenv(harness.RESULTS_ENV, raising=False)
    assert harness.results_dir() == harness.RESULTS
    monkeypatch.setenv(harness.RESULTS_ENV, str(tmp_path))
    path = harness.write_results([{"op": "x"}], "probe")
    assert path == str(tmp_path / "probe.json") and (tmp_path / "probe.csv").is_file()


def test_wheel_runs_every_bench_family_outside_the_repo(tmp_path):
    t0 = time.perf_counter()
    src, dist, site, work = (tmp_path / n for n in ("src", "dist", "site", "work"))
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    env = {**os.environ, "LORA_KERNELS_BUILD_CUDA": "0", "LORA_KERNELS_BUILD_CPU": "0", "PIP_NO_INPUT": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-build-isolation", "--no-deps", "-q", "-w", str(dist)],
         env=env, cwd=tmp_path)
    (wheel,) = dist.glob("lora_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for mod in (*CPU_FAMILIES, "bench_gpu", "harness", "__init__"):
        assert f"bench/{mod}.py" in names, f"bench/{mod}.py missing from the wheel"
    shipped_data = [n for n in names if n.startswith(("bench/results/", "bench/plots/"))
                    or (n.startswith("bench/") and not n.endswith(".py"))]
    assert shipped_data == []
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], env=env)
    t_wheel = time.perf_counter() - t0

    work.mkdir()
    out = tmp_path / "results"
    code = ("import os, sys, python_api, bench\n"
            f"site = {str(site)!r}\n"
            "for m in (python_api, bench):\n"
            "    assert os.path.realpath(m.__file__).startswith(os.path.realpath(site) + os.sep), m.__file__\n"
            "from python_api.app.cli import main\n"
            f"raise SystemExit(main(['bench', '--quick', '--out', {str(out)!r}]))\n")
    # One torch and one BLAS thread: the measured ratios do not matter here, and on a busy 2-core box two spinning
    # threads per process cost several times the wall time (bench_alpha --quick: 220 s with the BLAS default, 36 s).
    run_env = {**os.environ, "PYTHONPATH": str(site), "BENCH_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run_env.pop("LORA_KERNELS_BENCH_RESULTS", None)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env, cwd=work,
                       timeout=900)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-6000:]

    headers = dict(re.findall(r"^== (bench_\w+) \((\d+) rows", p.stdout, re.MULTILINE))
    for mod, stem in CPU_FAMILIES.items():
        assert mod in headers, f"{mod} printed no table\n{log[-4000:]}"
        with open(out / f"{stem}.json") as f:
            rows = json.load(f)["rows"]
        assert int(headers[mod]) == len(rows) > 0, mod
        assert (out / f"{stem}.csv").is_file()
    skipped = [ln for ln in log.splitlines() if "skipped" in ln.lower()]
    if torch.cuda.is_available():
        assert skipped == [] and int(headers.get("bench_gpu", 0)) > 0, log[-4000:]
    else:
        assert skipped == ["bench_gpu: skipped: no CUDA device"], skipped
    assert "FAILED" not in log
    assert "bench_step" in headers or "bench_step: not in this build" in p.stdout
    # nothing written next to the installed package, nor into the working folder
    assert not (site / "bench" / "results").exists() and list(work.iterdir()) == []
    print(f"wheel build + install {t_wheel:.1f} s, bench --quick {time.perf_counter() - t0 - t_wheel:.1f} s")
    print(p.stdout)

