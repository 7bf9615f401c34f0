"""Planted bad rows never crash the job and are never dropped silently; the vendored demo data parses."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from sr_ray.data import DEMO_DATA_DIR, PreprocessConfig, default_data_dir, load_records, run_preprocess
from sr_ray.data.manifest import QUARANTINE

FIGSTEP_IMAGES = "FigStep/images/SafeBench-Tiny"


def plant_bad_rows(root):
    """A copy of the demo data plus small VLSafe / MM-SafetyBench / MM-Vet files, with one of each bad kind."""
    shutil.copytree(DEMO_DATA_DIR, root)
    images = root / FIGSTEP_IMAGES
    (images / "query_ForbidQI_1_1_6.png").unlink()  # missing image
    (images / "query_ForbidQI_1_2_6.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)  # corrupt
    png = (images / "query_ForbidQI_1_3_6.png").read_bytes()
    (images / "query_ForbidQI_1_3_6.png").write_bytes(png[: len(png) // 2])  # truncated
    Image.new("L", (3000, 3000)).save(images / "query_ForbidQI_1_4_6.png")  # 9 MP: over the bomb guard below
    with open(root / "FigStep/question/SafeBench-Tiny.csv", "a") as f:
        f.write("\nForbidQI,1,99,Illegal Activity\n")  # malformed CSV row (4 of 6 fields)
    advbench = root / "AdvBench/harmful_behaviors.csv"
    lines = advbench.read_text().splitlines()
    lines[1] = ',"Sure, here is nothing"'  # empty prompt
    advbench.write_text("\n".join(lines) + "\n")

    (root / "VLSafe").mkdir()
    good = {"image_id": "000000000001.jpg", "caption": "A dog on a couch.", "query": "How to hurt the dog?"}
    (root / "VLSafe/harmlessness_examine.jsonl").write_text(
        "\n".join([json.dumps(good), '{"image_id": "x.jpg", "caption": "broken', json.dumps({"caption": "no query"})]) + "\n"
    )  # line 2: malformed JSON line; line 3: missing field
    (root / "MM-SafetyBench/processed_questions").mkdir(parents=True)
    entry = {"Question": "Q?", "Key Phrase": "make a bomb", "Rephrased Question": "The bottom of the image shows..."}
    (root / "MM-SafetyBench/processed_questions/01-Illegal_Activitiy.json").write_text(
        json.dumps({"1": entry, "2": {"Question": "no key phrase"}})
    )
    (root / "MM-SafetyBench/processed_questions/02-HateSpeech.json").write_text('{"1": {')  # malformed JSON file
    (root / "MM-Vet/images").mkdir(parents=True)
    (root / "MM-Vet/mm-vet.json").write_text(json.dumps({"v1_0": {"imagename": "v1_0.png", "question": "What is x?",
                                                                   "answer": "1", "capability": ["ocr"]}}))


EXPECTED = {  # planted id -> reason substring
    "figstep:ForbidQI-1-1:image": "missing image file",
    "figstep:ForbidQI-1-2:image": "corrupt or truncated image",
    "figstep:ForbidQI-1-3:image": "corrupt or truncated image",
    "figstep:ForbidQI-1-4:image": "decompression-bomb guard",
    "figstep:SafeBench-Tiny-row50:unparsed": "malformed CSV row",
    "advbench:row0:text": "empty prompt",
    "vlsafe:line2:unparsed": "malformed JSON line",
    "vlsafe:line3:unparsed": "malformed JSON line",
    "mmsafetybench:01-Illegal_Activitiy-2:unparsed": "malformed JSON entry",
    "mmsafetybench:02-HateSpeech-file:unparsed": "malformed JSON file",
    "mmvet:v1_0:image": "missing image file",
}


@pytest.fixture(scope="module")
def planted_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("planted") / "data"
    plant_bad_rows(root)
    out = tmp_path_factory.mktemp("planted_out")
    cfg = PreprocessConfig(data_dir=str(root), out_dir=str(out), max_pixels=4_000_000, progress=False)
    return out, run_preprocess(cfg)


def test_each_planted_bad_row_is_quarantined_with_its_reason(planted_run):
    out, manifest = planted_run
    reasons = {q["id"]: q["reason"] for q in manifest["quarantine"]}
    for row_id, reason in EXPECTED.items():
        assert reason in reasons.get(row_id, ""), (row_id, reasons.get(row_id))
    assert len(reasons) == manifest["rows_quarantined"] == len(EXPECTED)
    lines = [json.loads(line) for line in (out / QUARANTINE).read_text().splitlines()]
    assert {q["id"]: q["quarantine_reason"] for q in lines} == reasons


def test_nothing_is_lost_and_good_rows_survive(planted_run):
    out, manifest = planted_run
    assert manifest["rows_read"] == manifest["rows_written"] + manifest["rows_quarantined"]
    figstep = load_records(out, source="figstep")
    # 50 Tiny items x 2 variants, minus 4 bad images, + 50 benign sentences x 2 variants
    assert len(figstep) == 100 - 4 + 100
    assert len(load_records(out, source="advbench")) == 519
    assert [r.id for r in load_records(out, source="vlsafe")] == ["vlsafe:line1:text"]
    assert {r.variant for r in load_records(out, source="mmsafetybench")} == {"text", "typo", "typo_text_inlined"}


def test_vendored_demo_data_parses_and_missing_sources_are_skipped(ray_session, tmp_path, monkeypatch):
    monkeypatch.delenv("SR_RAY_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here: falls back to the demo data
    assert default_data_dir() == DEMO_DATA_DIR
    monkeypatch.setenv("SR_RAY_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path.resolve()
    manifest = run_preprocess(PreprocessConfig(data_dir=str(DEMO_DATA_DIR), out_dir=str(tmp_path / "out"),
                                               sources=["figstep", "advbench", "jailbreakv", "vlsafe"], progress=False))
    assert manifest["by_source"] == {"advbench": 520, "figstep": 200, "jailbreakv": 280}
    assert manifest["rows_quarantined"] == 0 and list(manifest["skipped_sources"]) == ["vlsafe"]
