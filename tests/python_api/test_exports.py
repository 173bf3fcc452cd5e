"""Every public name of python_api resolves on a fresh import, with no submodule imported first (issue #15: names
the README used raised AttributeError until their submodule had been imported)."""
from __future__ import annotations

import subprocess
import sys


def test_every_public_name_resolves_in_a_fresh_interpreter():
    code = ("import python_api as lk\n"
            "missing = [n for n in lk.__all__ if getattr(lk, n, None) is None]\n"
            "assert not missing, missing\n"
            "assert lk.shaplora.shaplora_workflow and lk.adalora.orthogonality_penalty and lk.to_peft_lora_config\n"
            "print(len(lk.__all__))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.strip()) >= 40
