"""`sr-ray bench data`: the image-heavy sources through Ray Data vs a one-process loop, same run.

Both sides run the per-row stage of `run_preprocess` (read image, validate, decode, normalise,
render typography, hash, write Parquet) on the same rows: FigStep typographic images, MM-Vet
images, MM-SafetyBench TYPO rendered locally; their shards must have the same `content_sha256`.
`ray.init` happens before either timing (Ray's fixed start-up, ~7 s), then both sides warm up on
the first WARMUP_ROWS rows, timed apart (`warmup_seconds`): Ray's first execution starts and
imports its workers and Ray Data's helper actors, which a long-running cluster pays once. Ray runs
first in each trial, so it also pays for any cold file cache. `repeat` > 1 replicates the rows
(fresh ids) and `limit_per_source` shrinks them, to measure at what size Ray pays off.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from sr_ray.data.config import PreprocessConfig
from sr_ray.data.manifest import SHARDS, summarise_shards
from sr_ray.data.pipeline import read_rows, run_in_loop, run_with_ray
from sr_ray.runtime import ensure_ray

BENCH_SOURCES = ["figstep", "mmvet", "mmsafetybench"]
BENCH_VARIANTS = ["image", "typo"]
WARMUP_ROWS = 64  # two decode blocks: one task per CPU of this machine


def _worker_niceness() -> int:
    import ray

    return ray.get(ray.remote(lambda: os.nice(0)).remote())


def run_data_benchmark(data_dir: str, num_cpus: int | None = None, limit_per_source: int | None = None,
                       repeat: int = 1, trials: int = 1) -> dict:
    """Time the decode/validate/normalise/write stage of both executors on the same rows.

    With `trials` > 1 the two sides alternate (ray, loop, ray, loop, ...) and the medians are
    reported, which damps bursts from other processes on a shared machine.
    """
    import ray

    cfg = PreprocessConfig(data_dir=data_dir, out_dir="unused", sources=BENCH_SOURCES, variants=BENCH_VARIANTS,
                           limit_per_source=limit_per_source, progress=False)
    base = read_rows(cfg).rows  # identical driver-side work for both sides: not timed
    rows = [dict(r, id=f"{r['id']}#{k}") for k in range(repeat) for r in base] if repeat > 1 else base
    ensure_ray(num_cpus)  # outside the timing
    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {"ray": [], "loop": []}
    warmup: dict[str, float] = {}
    digests = {}
    runners = (("ray", run_with_ray), ("loop", run_in_loop))
    with tempfile.TemporaryDirectory(prefix="sr_ray_bench_data_") as tmp:
        for name, runner in runners:
            start = time.perf_counter()
            runner([dict(r) for r in rows[:WARMUP_ROWS]], cfg, Path(tmp) / f"{name}-warmup" / SHARDS)
            warmup[name] = round(time.perf_counter() - start, 3)
        for trial in range(trials):
            for name, runner in runners:
                out = Path(tmp) / f"{name}{trial}"
                start = time.perf_counter()
                runner([dict(r) for r in rows], cfg, out / SHARDS)
                seconds[name].append(time.perf_counter() - start)
                digests[name] = summarise_shards(out)["content_sha256"]
    ray_s, loop_s = statistics.median(seconds["ray"]), statistics.median(seconds["loop"])
    return {
        "rows": len(rows),
        "ray_seconds": round(ray_s, 3),
        "loop_seconds": round(loop_s, 3),
        "ray_rows_per_s": round(len(rows) / ray_s, 2),
        "loop_rows_per_s": round(len(rows) / loop_s, 2),
        "speedup": round(loop_s / ray_s, 3),
        "same_output": digests["ray"] == digests["loop"],
        "trials": {name: [round(t, 3) for t in ts] for name, ts in seconds.items()},
        "warmup_rows": min(WARMUP_ROWS, len(rows)),
        "warmup_seconds": warmup,
        "sources": BENCH_SOURCES,
        "variants": BENCH_VARIANTS,
        "limit_per_source": limit_per_source,
        "repeat": repeat,
        "ray_cpus": ray.cluster_resources().get("CPU"),
        "ray_worker_niceness": _worker_niceness(),
        "machine_cpus": os.cpu_count(),
        "load_avg_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "note": "ray.init and a warm-up run of warmup_rows rows per side outside the timing (Ray's first execution "
                "starts its workers and helper actors); Ray timed first in each trial (pays any cold file cache); "
                "medians over trials; the machine may be shared (see load_avg_1min)",
    }


def write_benchmark(result: dict, out: str | Path) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
