"""`pipelines/preprocess.py` with the YAML config, and `sr-ray data stats` on its output."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

from sr_ray.cli import main as sr_ray_main
from sr_ray.data import DEMO_DATA_DIR, manifest_checksum

REPO = Path(__file__).resolve().parents[2]


def test_pipeline_entrypoint_and_stats(tmp_path, capsys):
    entry = runpy.run_path(str(REPO / "pipelines/preprocess.py"), run_name="entrypoint")
    argv = ["--config", str(REPO / "configs/preprocess.yaml"), "--data-dir", str(DEMO_DATA_DIR), "--out", str(tmp_path),
            "--sources", "advbench,jailbreakv", "--executor", "loop", "--no-progress"]
    assert entry["main"](argv) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["by_source"] == {"advbench": 520, "jailbreakv": 280}
    assert manifest["config"]["split_fractions"] == [0.5, 0.25, 0.25]  # from the YAML
    capsys.readouterr()
    assert sr_ray_main(["data", "stats", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "rows_read             800" in printed and manifest_checksum(tmp_path) in printed
