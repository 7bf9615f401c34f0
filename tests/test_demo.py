"""`sr-ray demo` helpers: the up-front data check and the printed ASR table (the full demo is the README's job)."""

import pytest

from sr_ray.data import DEMO_DATA_DIR, PreprocessConfig, run_preprocess
from sr_ray.demo import asr_table, require_probe_sources
from sr_ray.train.config import ProbeFitConfig, RecordSelection


def test_vendored_data_alone_fails_before_training_with_a_clear_reason(tmp_path):
    manifest = run_preprocess(PreprocessConfig(data_dir=str(DEMO_DATA_DIR), out_dir=str(tmp_path / "data"),
                                               sources=["advbench"], executor="loop", progress=False))
    probe_cfg = ProbeFitConfig(harmful=[RecordSelection("harmful_harmless")], benign=[RecordSelection("harmful_harmless")])
    with pytest.raises(SystemExit, match=r"needs \['harmful_harmless'\].*--data-dir"):
        require_probe_sources(manifest, probe_cfg, DEMO_DATA_DIR)
    require_probe_sources(manifest, ProbeFitConfig(harmful=[RecordSelection("advbench")], benign=[]), DEMO_DATA_DIR)


def test_asr_table_shows_full_response_asr_and_benign_refusal():
    metrics = {
        "undefended": {"advbench": {"asr_full": 1.0}, "harmless": {"asr_full": None, "refusal_rate": 0.0}},
        "safety_reminder": {"advbench": {"asr_full": 0.125}, "harmless": {"asr_full": None, "refusal_rate": 0.0625}},
    }
    lines = asr_table(metrics).splitlines()
    assert lines[1].split() == ["system", "advbench", "harmless"]
    assert lines[2].split() == ["undefended", "100.0%", "0.0%"]
    assert lines[3].split() == ["safety_reminder", "12.5%", "6.2%"]
