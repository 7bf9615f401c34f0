"""The SAPT train loop's warm start: SAPT continues from a bundle's soft prompt (`init_from`)."""

from __future__ import annotations

import pytest
import torch

from sr_ray.models import load_vlm
from sr_ray.reminder import ReminderBundle, SoftPrompt
from sr_ray.train.loop import warm_start


def test_a_warm_start_continues_from_the_bundles_soft_prompt(tiny_bundle):
    vlm = load_vlm("tiny-llava")
    saved = ReminderBundle.load(tiny_bundle, vlm).soft_prompt
    for path in (tiny_bundle, tiny_bundle / "soft_prompt"):  # a bundle dir or the soft prompt's own dir
        prompt = warm_start(str(path), vlm, k=saved.k)
        assert torch.equal(prompt.embeddings, saved.embeddings) and prompt.embeddings.requires_grad
        assert not torch.equal(prompt.embeddings, SoftPrompt.from_text(vlm, "another start", saved.k).embeddings)
    with pytest.raises(ValueError, match="k=4, the config asks for k=8"):
        warm_start(str(tiny_bundle), vlm, k=8)
    with pytest.raises(ValueError, match="tiny-llava"):
        warm_start(str(tiny_bundle), load_vlm("tiny-qwen2-vl"), k=saved.k)  # made for another base model
