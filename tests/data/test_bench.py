"""`sr-ray bench data` plumbing on a few real rows (no timing asserted: timings live in the benchmark's JSON)."""

from __future__ import annotations

import json

import pytest

from sr_ray.cli import main as sr_ray_main
from sr_ray.data.bench import BENCH_SOURCES, WARMUP_ROWS


def test_bench_data_runs_both_executors_on_the_same_rows(data_dir, ray_session, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "data", "--data-dir", str(data_dir), "--out", str(out), "--limit-per-source", "4", "--repeat", "2",
            "--trials", "2"]
    assert sr_ray_main(argv) == 0
    result = json.loads(out.read_text())
    assert result["rows"] == 4 * len(BENCH_SOURCES) * 2  # 4 image rows per source, replicated with fresh ids
    assert result["same_output"] is True  # Ray and the loop wrote identical shards
    assert [len(result["trials"][side]) for side in ("ray", "loop")] == [2, 2]
    assert result["warmup_rows"] == min(WARMUP_ROWS, result["rows"]) and set(result["warmup_seconds"]) == {"ray", "loop"}
    # The JSON rounds seconds for reading; the ratios come from the unrounded timings.
    assert result["speedup"] == pytest.approx(result["loop_seconds"] / result["ray_seconds"], rel=0.02)
    assert result["ray_rows_per_s"] == pytest.approx(result["rows"] / result["ray_seconds"], rel=0.02)
