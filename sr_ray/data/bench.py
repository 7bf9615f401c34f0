"""`sr-ray bench data`: the image-heavy sources through Ray Data vs a one-process loop, same run.

Both sides run the per-row stage of `run_preprocess` (read image, validate, decode, normalise,
render typography, hash, write Parquet) on the same rows: FigStep typographic images, MM-Vet
images, MM-SafetyBench TYPO rendered locally; their shards must have the same `content_sha256`.
`ray.init` happens before either timing (Ray's fixed start-up, ~7 s); the Ray timing still
includes its first-task costs (worker imports, scheduling). Ray runs first, so it also pays for
any cold file cache. `repeat` > 1 replicates the rows (fresh ids) and `limit_per_source` shrinks
them, to measure at what size Ray's fixed costs stop dominating.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from sr_ray.data.config import PreprocessConfig
from sr_ray.data.manifest import SHARDS, summarise_shards
from sr_ray.data.pipeline import ensure_ray, read_rows, run_in_loop, run_with_ray

BENCH_SOURCES = ["figstep", "mmvet", "mmsafetybench"]
BENCH_VARIANTS = ["image", "typo"]


def run_data_benchmark(data_dir: str, num_cpus: int | None = None, limit_per_source: int | None = None,
                       repeat: int = 1) -> dict:
    """Time the decode/validate/normalise/write stage of both executors on the same rows."""
    import ray

    cfg = PreprocessConfig(data_dir=data_dir, out_dir="unused", sources=BENCH_SOURCES, variants=BENCH_VARIANTS,
                           limit_per_source=limit_per_source, progress=False)
    base = read_rows(cfg).rows  # identical driver-side work for both sides: not timed
    rows = [dict(r, id=f"{r['id']}#{k}") for k in range(repeat) for r in base] if repeat > 1 else base
    ensure_ray(num_cpus)  # outside the timing
    seconds, digests = {}, {}
    with tempfile.TemporaryDirectory(prefix="sr_ray_bench_data_") as tmp:
        for name, runner in (("ray", run_with_ray), ("loop", run_in_loop)):
            out = Path(tmp) / name
            start = time.perf_counter()
            runner([dict(r) for r in rows], cfg, out / SHARDS)
            seconds[name] = time.perf_counter() - start
            digests[name] = summarise_shards(out)["content_sha256"]
    return {
        "rows": len(rows),
        "ray_seconds": round(seconds["ray"], 3),
        "loop_seconds": round(seconds["loop"], 3),
        "ray_rows_per_s": round(len(rows) / seconds["ray"], 2),
        "loop_rows_per_s": round(len(rows) / seconds["loop"], 2),
        "speedup": round(seconds["loop"] / seconds["ray"], 3),
        "same_output": digests["ray"] == digests["loop"],
        "sources": BENCH_SOURCES,
        "variants": BENCH_VARIANTS,
        "limit_per_source": limit_per_source,
        "repeat": repeat,
        "ray_cpus": ray.cluster_resources().get("CPU"),
        "machine_cpus": os.cpu_count(),
        "note": "ray.init outside the timing; Ray timed first (pays cold file cache and worker start-up); one run each",
    }


def write_benchmark(result: dict, out: str | Path) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
