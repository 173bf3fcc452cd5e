"""Fixtures shared by the ``lora-kernels train`` tests."""
from __future__ import annotations

import os

import pytest

from . import byo_fixtures as F


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """The tiny offline models and data files (byo_fixtures.make_all), built once per test module."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return F.make_all(str(tmp_path_factory.mktemp("byo")))
