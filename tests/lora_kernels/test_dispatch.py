import os
import subprocess
import sys

import pytest
import torch

import lora_kernels
from lora_kernels import dispatch
from lora_kernels.gated_lora import op as gated


def test_available_backends_reports_each_with_reason():
    info = lora_kernels.available_backends()
    assert set(info) == {"torch", "cpu", "native", "triton", "cuda"}
    for name, v in info.items():
        assert isinstance(v["usable"], bool) and v["reason"], name
    assert info["torch"]["usable"]
    if not torch.cuda.is_available():
        assert not info["cuda"]["usable"]


def test_auto_picks_the_cpu_backend_on_cpu_and_torch_when_forced(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "auto")
    name, _ = gated.select_backend(torch.randn(4, 4), None, 0.0)
    assert name == "cpu"
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    name, _ = gated.select_backend(torch.randn(4, 4), None, 0.0)
    assert name == "torch"


def test_forced_unusable_backend_raises_with_reason(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "cuda")
    with pytest.raises(dispatch.BackendUnavailable, match="LORA_KERNELS_BACKEND=cuda but it cannot run"):
        gated.select_backend(torch.randn(4, 4), None, 0.0)


def test_bad_env_value(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LORA_KERNELS_BACKEND='fastest'"):
        dispatch.requested_backend()


def test_no_backend_lists_every_reason(monkeypatch):
    class Never:
        @staticmethod
        def supports(p):
            return False, "never"
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "auto")
    p = dispatch.Problem("x", torch.device("cpu"), torch.float32)
    with pytest.raises(dispatch.BackendUnavailable, match="torch: never"):
        dispatch.select(p, {"torch": Never()})


def test_import_is_lean():
    """Importing the packages never imports triton, never initialises CUDA, never loads the compiled module."""
    code = (
        "import sys, torch, lora_kernels, python_api\n"
        "python_api.LoRALinear; python_api.lora_linear\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert 'lora_kernels._lora_kernels_cuda' not in sys.modules, 'compiled module loaded'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
