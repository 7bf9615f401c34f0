"""Data pipeline: the safety benchmarks in one schema, as Parquet shards made by Ray Data.

    from sr_ray.data import PreprocessConfig, run_preprocess, load_records
    manifest = run_preprocess(PreprocessConfig(data_dir=default_data_dir(), out_dir="runs/data"))
    records = load_records("runs/data", source="figstep", variant="image", split="test")
"""

from __future__ import annotations

import os
from pathlib import Path

from sr_ray.data.config import PreprocessConfig
from sr_ray.data.manifest import SHARDS, manifest_checksum, read_manifest
from sr_ray.data.pipeline import run_preprocess
from sr_ray.data.schema import LABELS, SOURCES, SPLITS, Record

DEMO_DATA_DIR = Path(__file__).resolve().parent.parent / "demo_data"

__all__ = [
    "LABELS", "SOURCES", "SPLITS", "DEMO_DATA_DIR", "PreprocessConfig", "Record", "default_data_dir",
    "load_records", "manifest_checksum", "read_manifest", "run_preprocess",
]


def default_data_dir() -> Path:
    """$SR_RAY_DATA_DIR, else ../shared/data (relative to the cwd) if it exists, else the vendored demo data."""
    if os.environ.get("SR_RAY_DATA_DIR"):
        return Path(os.environ["SR_RAY_DATA_DIR"]).expanduser().resolve()
    shared = Path("../shared/data").resolve()
    return shared if shared.is_dir() else DEMO_DATA_DIR


def load_records(
    out_dir: str | Path,
    source: str | None = None,
    variant: str | None = None,
    split: str | None = None,
    label: str | None = None,
    limit: int | None = None,
    paper_subset: bool | None = None,
) -> list[Record]:
    """Records of a preprocessed output dir, filtered (pushed down into the Parquet scan), sorted by id."""
    import pyarrow.dataset as pads

    files = sorted(str(p) for p in (Path(out_dir) / SHARDS).glob("*.parquet"))
    if not files:
        read_manifest(out_dir)  # a clear error when out_dir is not a preprocess output at all
        return []
    conditions = [pads.field(k) == v for k, v in
                  (("source", source), ("variant", variant), ("split", split), ("label", label), ("paper_subset", paper_subset))
                  if v is not None]
    expr = None
    for cond in conditions:
        expr = cond if expr is None else expr & cond
    rows = pads.dataset(files, format="parquet").to_table(filter=expr).to_pylist()
    rows.sort(key=lambda r: r["id"])
    return [Record.from_row(r) for r in rows[:limit]]
