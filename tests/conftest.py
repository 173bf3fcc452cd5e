import os

import pytest


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture
def triton_backend(monkeypatch):
    """Forces the triton backend for the test; skips with the reason when it cannot run here."""
    import lora_kernels
    info = lora_kernels.available_backends()["triton"]
    if not info["usable"]:
        pytest.skip(f"triton backend unusable: {info['reason']}")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    return "triton"
