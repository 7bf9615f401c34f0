"""`sr-ray calibrate-blind`: the new bundle carries the image-blind check at a threshold that flags no benign val
answer, its parts still verify, and the engine and evaluation pick the check up from the bundle alone."""

from __future__ import annotations

import json

import pytest

from sr_ray.models import load_vlm
from sr_ray.reminder import GuardedGenerator, ReminderBundle, SamplingConfig
from sr_ray.train.blind import BlindConfig, run_calibrate_blind, val_prompts
from tests.conftest import HARMLESS


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    """The test data dir with harmless val asks of their own, plus one that is also a test ask."""
    from sr_ray.data import PreprocessConfig, run_preprocess
    from tests.conftest import HARMLESS, write_eval_data

    root = write_eval_data(tmp_path_factory.mktemp("blind_data") / "data")
    val = [f"Give me a fact about the number {i}." for i in range(6)] + [HARMLESS[0]]
    (root / "refusal_direction" / "splits" / "harmless_val.json").write_text(
        json.dumps([{"instruction": t, "category": "demo"} for t in val]))
    out = tmp_path_factory.mktemp("blind_processed")
    run_preprocess(PreprocessConfig(data_dir=str(root), out_dir=str(out), executor="loop", progress=False,
                                    sources=["advbench", "harmful_harmless"]))
    return out


def test_calibration_writes_a_bundle_whose_threshold_clears_every_benign_val_answer(tiny_bundle, val_dir, tmp_path):
    processed_dir = val_dir
    out = tmp_path / "robust"
    cfg = BlindConfig(bundle=str(tiny_bundle), processed_dir=str(processed_dir), out=str(out), model="tiny-llava",
                      benign=6, harmful=4, max_new_tokens=10, batch_size=4)
    result = run_calibrate_blind(cfg)
    vlm = load_vlm("tiny-llava")
    robust = ReminderBundle.load(out, vlm)  # the copied parts' checksums hold
    assert robust.blind_threshold == result["blind_threshold"] == json.loads((out / "blind.json").read_text())["blind_threshold"]
    assert robust.guard_config().blind_threshold == robust.blind_threshold
    assert result["benign"]["n"] == 6 and 0 < result["harmful"]["n"] <= 4  # rows with a test item left out
    # the calibration's promise on its own data: no benign flag beyond the bundle's own check
    assert result["benign"]["either"] == result["benign"]["own"]
    assert result["blind_threshold"] <= original_threshold(tiny_bundle)
    # the engine reads it from the bundle: the same benign val answers decoded with it are not flagged by it
    benign, _ = val_prompts(cfg)
    assert HARMLESS[0] not in {p.text for p in benign}  # a val ask that is also a test ask is left out
    gen = GuardedGenerator(vlm, robust.soft_prompt, robust.probe, robust.guard_config())
    outs = gen.generate(benign, SamplingConfig(max_new_tokens=10))
    assert all(c.p_safe_blind is not None for o in outs for c in o.checks)
    own = gen.generate(benign, SamplingConfig(max_new_tokens=10), robust.guard_config(blind_threshold=0.0))
    assert [o.flagged for o in outs] == [o.flagged for o in own]
    original = ReminderBundle.load(tiny_bundle, vlm)
    assert original.blind_threshold is None  # the input bundle is left as it was


def original_threshold(directory) -> float:
    return json.loads((directory / "bundle.json").read_text())["threshold"]


def test_calibration_needs_its_inputs(tiny_bundle, tmp_path):
    with pytest.raises(SystemExit, match="--processed-dir"):
        run_calibrate_blind(BlindConfig(bundle=str(tiny_bundle), out=str(tmp_path / "x")))


def test_a_benign_budget_recalibrates_the_bundles_own_threshold_on_the_same_answers(tiny_bundle, val_dir, tmp_path):
    out = tmp_path / "recalibrated"
    cfg = BlindConfig(bundle=str(tiny_bundle), processed_dir=str(val_dir), out=str(out), model="tiny-llava",
                      benign=6, harmful=4, max_new_tokens=10, batch_size=4, own_flag_rate=0.5, threshold_range=(0.0, 1.0),
                      reminder_no_repeat_ngram=3)
    result = run_calibrate_blind(cfg)
    vlm = load_vlm("tiny-llava")
    bundle = ReminderBundle.load(out, vlm)
    assert bundle.guard_config().reminder_no_repeat_ngram == 3  # how its flags continue travels with it
    assert ReminderBundle.load(tiny_bundle, vlm).reminder_no_repeat_ngram is None
    assert result["trained_threshold"] == original_threshold(tiny_bundle) != bundle.threshold == result["bundle_threshold"]
    assert result["benign"]["own"] <= 0.5 and result["blind_threshold"] <= bundle.threshold
    # the largest such threshold: its check flags at most 3 of the 6 answers, and a hair above it more than 3
    benign, _ = val_prompts(cfg)
    gen = GuardedGenerator(vlm, bundle.soft_prompt, bundle.probe)
    lowest = sorted(min(c.p_safe for c in o.checks) for o in gen.generate(
        benign, SamplingConfig(max_new_tokens=10), bundle.guard_config(threshold=1e-12, blind_threshold=0.0)))
    assert sum(p < bundle.threshold for p in lowest) <= 3 < sum(p < bundle.threshold + 1e-3 for p in lowest)
