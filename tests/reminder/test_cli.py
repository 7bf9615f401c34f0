"""`sr-ray generate` end to end on a tiny model with a saved bundle."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from sr_ray.cli import main
from sr_ray.models import load_vlm
from tests.bundles import constant_probe_bundle


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    vlm = load_vlm("tiny-llava")
    d = tmp_path_factory.mktemp("bundle")
    return constant_probe_bundle(vlm, d, bias=-10.0, interval=8)  # always flags


def test_generate_prints_the_answer_and_the_trace(bundle_dir, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40), "green").save(image)
    main(["generate", "--model", "tiny-llava", "--image", str(image), "--prompt", "What is this?",
          "--bundle", str(bundle_dir), "--max-new-tokens", "20", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["trace"]["flagged_at"] == 8 and out["trace"]["checks"] == [8]
    assert out["text"].startswith(out["prefix_text"]) and out["continuation_text"]


def test_generate_without_artifacts_explains_what_it_needs(capsys):
    with pytest.raises(SystemExit, match="--bundle"):
        main(["generate", "--model", "tiny-llava", "--prompt", "hi"])
    main(["generate", "--model", "tiny-llava", "--prompt", "hi", "--no-guard", "--max-new-tokens", "5"])
    assert "finish: length" in capsys.readouterr().out
