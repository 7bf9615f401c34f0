"""Data-area fixtures: the real data dir (shared/data beside the clone, or $SR_RAY_DATA_DIR)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def real_data_dir() -> Path:
    if os.environ.get("SR_RAY_DATA_DIR"):
        return Path(os.environ["SR_RAY_DATA_DIR"]).resolve()
    return (Path(__file__).parents[2] / "../shared/data").resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = real_data_dir()
    assert (path / "README.md").exists(), f"real benchmark data not found at {path} (set SR_RAY_DATA_DIR)"
    return path
