"""The Ray Data pipeline on the real data (small per-source limits): shards, manifest, splits, loading."""

from __future__ import annotations

import io
import json
from collections import Counter

import pytest
from PIL import Image

from sr_ray.data import PreprocessConfig, load_records, manifest_checksum, run_preprocess
from sr_ray.data.manifest import QUARANTINE
from sr_ray.data.schema import SOURCES
from sr_ray.data.splits import hash_split

LIMIT = 24


@pytest.fixture(scope="module")
def tiny_processor_dir(tmp_path_factory):
    """The tiny LLaVA's processor (chat template + tokenizer), saved like a checkpoint."""
    from sr_ray.models.tiny import tiny_llava

    path = tmp_path_factory.mktemp("tiny_llava_processor")
    tiny_llava()[1].save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def small_run(ray_session, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    return out, run_preprocess(PreprocessConfig(data_dir=str(data_dir), out_dir=str(out), limit_per_source=LIMIT, progress=False))


@pytest.fixture(scope="module")
def larger_tokenized_run(ray_session, data_dir, tmp_path_factory, tiny_processor_dir):
    out = tmp_path_factory.mktemp("larger")
    cfg = PreprocessConfig(data_dir=str(data_dir), out_dir=str(out), limit_per_source=2 * LIMIT, progress=False,
                           tokenizer=tiny_processor_dir)
    return out, run_preprocess(cfg)


def test_every_source_is_written_and_accounted_for(small_run):
    out, manifest = small_run
    assert manifest["rows_read"] == manifest["rows_written"] + manifest["rows_quarantined"]
    assert manifest["rows_quarantined"] == 0 and manifest["skipped_sources"] == {}
    assert manifest["by_source"] == {s: LIMIT for s in sorted(SOURCES)}
    assert sum(manifest["by_split"].values()) == sum(manifest["by_label"].values()) == manifest["rows_written"]
    assert "FigStep/question/safebench.csv" in manifest["input_checksums"]
    assert (out / QUARANTINE).read_text() == ""


def test_records_are_model_ready(small_run):
    out, manifest = small_run
    records = load_records(out)
    assert len(records) == manifest["rows_written"]
    for record in records:
        assert record.prompt.strip() and record.label in ("harmful", "benign") and record.split in ("train", "val", "test")
        if record.image is not None:
            image = Image.open(io.BytesIO(record.image))
            assert image.mode == "RGB" and max(image.size) <= 768
    typo = load_records(out, source="mmsafetybench", variant="typo")
    assert typo and all(r.image is not None and r.image_sha256 for r in typo)
    text = load_records(out, source="mmsafetybench", variant="text", limit=3)
    assert len(text) == 3 and all(r.image is None for r in text)
    assert {r.variant for r in load_records(out, source="figstep", label="harmful")} == {"image", "text_inlined"}


def test_splits_come_from_seed_and_item_not_row_order(small_run, larger_tokenized_run):
    small = {r.id: r.split for r in load_records(small_run[0])}
    larger = {r.id: r for r in load_records(larger_tokenized_run[0])}
    assert set(small) < set(larger)
    assert all(larger[i].split == s for i, s in small.items())
    for record in larger.values():
        if record.source not in ("advbench", "harmful_harmless"):  # those keep their official splits
            assert record.split == hash_split(f"{record.source}:{record.item_id}", 0, (0.5, 0.25, 0.25))
    by_item = {}
    for record in larger.values():
        by_item.setdefault((record.source, record.item_id), set()).add(record.split)
    assert all(len(splits) == 1 for splits in by_item.values())  # variants of one item never straddle splits


def test_rerun_and_loop_executor_reproduce_the_manifest(small_run, data_dir, tmp_path):
    out, manifest = small_run
    loop = run_preprocess(PreprocessConfig(data_dir=str(data_dir), out_dir=str(tmp_path), limit_per_source=LIMIT,
                                           executor="loop", progress=False))
    assert loop["content_sha256"] == manifest["content_sha256"]
    assert manifest_checksum(tmp_path) == manifest_checksum(out)
    assert json.loads((out / "manifest.json").read_text())["run"]["executor"] == "ray"


def test_tokenize_stage_applies_the_chat_template(larger_tokenized_run):
    out, manifest = larger_tokenized_run
    assert manifest["tokenized"]
    with_image = load_records(out, source="figstep", variant="image", limit=1)[0]
    assert "<image>" in with_image.chat_prompt and with_image.chat_prompt.endswith("<|im_start|>assistant\n")
    text_only = load_records(out, source="advbench", limit=1)[0]
    assert "<image>" not in text_only.chat_prompt and text_only.prompt in text_only.chat_prompt
    assert text_only.input_ids and all(isinstance(t, int) for t in text_only.input_ids)
    assert Counter(r.chat_prompt is None for r in load_records(out)) == {False: manifest["rows_written"]}
