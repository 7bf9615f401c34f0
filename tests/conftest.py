"""Shared fixtures: offline environment, tiny VLMs (one build per session)."""

from __future__ import annotations

import pytest

from sr_ray.runtime import quiet_third_party

quiet_third_party()

TINY_MODELS = ["tiny-llava", "tiny-qwen2-vl"]


@pytest.fixture(scope="session", params=TINY_MODELS)
def tiny_vlm(request):
    """Each tiny architecture once per session (seeded weights: identical on every build)."""
    from sr_ray.models import load_vlm

    return load_vlm(request.param)
