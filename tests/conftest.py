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


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole run. 4 logical CPUs on 2 cores: Ray Train workers and Ray Data
    tasks can then run side by side (with 2, two 1-CPU train workers leave none for Ray Data: the run hangs)."""
    import ray

    from sr_ray.runtime import ray_runtime_env

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, runtime_env=ray_runtime_env())
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
