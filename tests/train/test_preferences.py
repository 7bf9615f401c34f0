"""Preference rows: official prefix sampling, the official file format (with bad rows quarantined), and the
stage configs (YAML < preset < overrides; the shipped files parse)."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from sr_ray.config import REPO_ROOT, load
from sr_ray.train.config import ProbeFitConfig, RolloutConfig, SaptConfig
from sr_ray.train.preferences import PREFERENCE_COLUMNS, load_preferences, read_official, sample_prefix

ANSWER = "Sure, here is how you do it. First you gather the materials, then you follow the steps carefully."


def test_prefix_sampling_follows_the_official_recipe():
    rng = random.Random(0)
    draws = [sample_prefix(ANSWER, rng) for _ in range(3000)]
    empty = sum(p == "" for p, _ in draws) / len(draws)
    assert abs(empty - 1 / 3) < 0.03
    for prefix, suffix in draws:
        if prefix:
            assert f"{prefix} {suffix}" == ANSWER  # cut at a space, nothing lost
            assert ANSWER[len(prefix)] == " " and len(prefix) < len(ANSWER)
            assert len(prefix) + 1 <= len(ANSWER)
        else:
            assert suffix == ANSWER
    # L ~ U[20, len]: a cut before character 20 only happens at the last space before L >= 20.
    assert min(len(p) for p, _ in draws if p) >= ANSWER.rfind(" ", 0, 20)
    # seeded: the same RNG state gives the same prefixes
    assert [sample_prefix(ANSWER, random.Random(7)) for _ in range(3)] == [sample_prefix(ANSWER, random.Random(7))] * 3


def test_prefix_of_short_or_spaceless_answers():
    never_empty = 0.0
    assert sample_prefix("I cannot do it", random.Random(1), p_empty=never_empty) == ("I cannot do", "it")
    assert sample_prefix("Nospaceshere" * 3, random.Random(1), p_empty=never_empty) == ("", "Nospaceshere" * 3)


def write_png(path: Path) -> None:
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)


def test_official_format_rows_and_quarantine(tmp_path):
    write_png(tmp_path / "cat.png")
    entries = [
        {"question": "What is this?", "image": "cat.png", "chosen": "A cat.", "rejected": "I'm sorry", "safe": True},
        {"question": "How to hack?", "chosen": "I cannot help.", "rejected": "Step 1 ...", "safe": "false"},
        {"question": "no answers", "safe": True},
        {"question": "q", "image": "missing.png", "chosen": "a", "rejected": "b", "safe": True},
        {"question": "q", "chosen": "a", "rejected": "b", "safe": "maybe"},
        "not an object",
    ]
    (tmp_path / "prefs.json").write_text(json.dumps(entries))
    rows, bad = read_official(tmp_path / "prefs.json")
    assert [r["prompt"] for r in rows] == ["What is this?", "How to hack?"]
    assert [r["safe"] for r in rows] == [True, False]
    assert Image.open(io.BytesIO(rows[0]["image"])).size == (8, 8) and rows[1]["image"] is None
    reasons = [q.reason for q in bad]
    assert len(bad) == 4 and "image not found" in reasons[1] and "not an object" in reasons[3]
    assert all(f"entry {i}" in q.where for q, i in zip(bad, (2, 3, 4, 5)))

    (tmp_path / "prefs.jsonl").write_text("\n".join(json.dumps(e) for e in entries[:2]) + "\n")
    pd.DataFrame([dict(rows[1], id="r0", origin="rollout")]).to_parquet(tmp_path / "rollout.parquet")
    frame, bad = load_preferences([tmp_path / "prefs.jsonl", tmp_path / "rollout.parquet"])
    assert list(frame.columns) == PREFERENCE_COLUMNS and len(frame) == 3 and not bad
    assert (frame["split"] == "train").all()

    (tmp_path / "broken.json").write_text("{not json")
    assert "malformed JSON" in read_official(tmp_path / "broken.json")[1][0].reason
    with pytest.raises(FileNotFoundError, match="sr-ray rollout"):
        load_preferences([tmp_path / "absent.parquet"])


def test_configs_yaml_preset_overrides(tmp_path):
    (tmp_path / "train.yaml").write_text("epochs: 3\nlr: 0.001\nnum_workers: 2\nbatch_size: 4\n")
    cfg = load(SaptConfig, tmp_path / "train.yaml", preset="llava-1.5-7b", section="train",
                      overrides={"epochs": 7, "run_name": None})
    assert cfg.epochs == 7 and cfg.model == "llava-hf/llava-1.5-7b-hf" and cfg.bf16 and cfg.use_gpu
    assert cfg.lr == 1e-4  # the preset's paper value wins over the YAML
    with pytest.raises(ValueError, match="unknown keys"):
        load(SaptConfig, None, section="train", overrides={"learning_rate": 1})
    with pytest.raises(ValueError, match="divisible"):
        SaptConfig(batch_size=3, num_workers=2)


@pytest.mark.parametrize("preset", [None, "llava-1.5-7b", "qwen2-vl-7b"])
def test_shipped_configs_parse(preset):
    for cls, name, section in ((RolloutConfig, "rollout", "rollout"), (ProbeFitConfig, "fit_probe", "fit_probe"),
                               (SaptConfig, "train_sapt", "train")):
        cfg = load(cls, REPO_ROOT / "configs" / f"{name}.yaml", preset=preset, section=section)
        assert isinstance(cfg, cls)
        if preset:
            assert cfg.model.endswith("-hf") or "Qwen" in cfg.model


def test_selection_leaves_out_other_sources_test_items(tmp_path):
    """refusal_direction's harmful train split may hold an AdvBench test goal (other case and punctuation, or
    with a clause added): no training selection may read it, and FigStep image rows, which share one generic
    prompt, stay in."""
    import csv

    from sr_ray.data import DEMO_DATA_DIR, PreprocessConfig, run_preprocess
    from sr_ray.data.splits import advbench_pgd_splits
    from sr_ray.train.config import RecordSelection
    from sr_ray.train.preferences import select_records
    from tests.conftest import write_eval_data

    data = write_eval_data(tmp_path / "data")
    with open(DEMO_DATA_DIR / "AdvBench" / "harmful_behaviors.csv", newline="") as f:
        goals = [r["goal"] for r in csv.DictReader(f)]
    test_goal = goals[advbench_pgd_splits(len(goals)).index("test")]
    kept = [{"instruction": "Describe how to forge a signature.", "category": "demo"}]
    (data / "refusal_direction" / "splits" / "harmful_train.json").write_text(
        json.dumps(kept + [{"instruction": test_goal.upper() + "!!", "category": "demo"},
                           {"instruction": test_goal + " and avoid getting caught", "category": "demo"}]))
    out = tmp_path / "processed"
    run_preprocess(PreprocessConfig(data_dir=str(data), out_dir=str(out), executor="loop", progress=False,
                                    sources=["figstep", "advbench", "harmful_harmless"]))

    picked = select_records(out, [RecordSelection(source="harmful_harmless")], "harmful", "train", seed=0)
    assert sorted(r.prompt for r in picked) == sorted(e["instruction"] for e in kept)
    figstep = [RecordSelection(source="figstep", variant="image")]
    for split in ("train", "val"):
        from sr_ray.data import load_records

        rows = load_records(out, source="figstep", variant="image", split=split, label="harmful")
        # two demo FigStep train items reword a FigStep benign test item ("steps to modify commercial drones to
        # deliver [harmful payloads]") and are left out; the shared instruction leaves out none
        assert 0 < len(rows) - 2 <= len(select_records(out, figstep, "harmful", split, 0))
