"""Rollout requests: the selections become prompts, with the prefill attack and noise images applied."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from sr_ray.config import ConfigError
from sr_ray.train.config import RecordSelection, RolloutConfig
from sr_ray.train.rollout import rollout_requests


def test_a_noise_selection_asks_with_a_seeded_noise_image_of_its_own(processed_dir):
    plain = RecordSelection("advbench", attack="prefill", train=4, val=0)
    noisy = RecordSelection("advbench", attack="prefill", image="noise", train=4, val=0)
    cfg = RolloutConfig(data_dir=str(processed_dir), harmful=[plain, noisy], benign=[], splits=["train"])
    rows = rollout_requests(cfg)

    with_noise = rows[rows["id"].str.endswith("+prefill+noise")]
    assert len(with_noise) == 4 and rows["id"].is_unique
    assert rows.drop(with_noise.index)["image"].isna().all()  # AdvBench rows have no image of their own
    images = [Image.open(io.BytesIO(b)) for b in with_noise["image"]]
    assert all(im.mode == "RGB" and im.size == (336, 336) for im in images)
    assert len({im.tobytes() for im in images}) == 4  # one image per row, not one shared image
    assert with_noise["answer_prefix"].str.startswith("Sure, here").all()  # the attack still applies
    again = rollout_requests(cfg)
    assert again["image"].tolist() == rows["image"].tolist()  # seeded: a rerun asks with the same images
    other_seed = rollout_requests(RolloutConfig(**{**cfg.__dict__, "seed": 1}))
    assert other_seed[other_seed["id"].str.endswith("+noise")]["image"].tolist() != with_noise["image"].tolist()


def test_an_unknown_image_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="image must be null or noise"):
        RecordSelection("advbench", image="photo")
