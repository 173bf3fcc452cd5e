import os
import sys

import pytest
from hypothesis import HealthCheck, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Generated cases per property test: "ci" (the default) 200, "nightly" 2000; choose with HYPOTHESIS_PROFILE.
for _name, _n in (("ci", 200), ("nightly", 2000)):
    settings.register_profile(_name, max_examples=_n, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
