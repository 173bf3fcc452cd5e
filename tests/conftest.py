import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests: "ci" (the default) 200 generated cases per property, derandomized so a CI run is reproducible;
# "nightly" 2000 (HYPOTHESIS_PROFILE=nightly). No example database (the suite runs with -p no:cacheprovider and
# leaves no files behind); no deadline: the 2-core CI machine is shared and one case's time says nothing about
# correctness.
_common = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=200, derandomize=True, **_common)
settings.register_profile("nightly", max_examples=2000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors: on a loaded 2-core machine OpenMP's thread wake-ups
    (measured: a [2, 3, 3] softmax at ~28 ms) cost more than the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def torch_backend_one_thread(one_thread):
    """``one_thread`` with the torch backend forced (LORA_KERNELS_BACKEND=torch) for the module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_KERNELS_BACKEND", "torch")
        yield


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
