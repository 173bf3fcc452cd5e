import os

import pytest
from hypothesis import settings

# Property tests: >= 200 generated cases per entry point in CI, reproducible; HYPOTHESIS_PROFILE=nightly for more.
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True)
settings.register_profile("nightly", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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
