"""The preprocessing pipeline: read -> validate + decode images -> normalise -> Parquet shards + manifest.

Reading (small metadata files) happens on the driver; the per-row work (image read, decode,
validation, EXIF transpose, RGB, resize, typography rendering, hashing) runs in Ray Data
`map_batches` tasks. Rows that fail are not dropped: they travel on with a `quarantine_reason` and
are split off at the end into `quarantine.jsonl`, and every run checks
rows_read == rows_written + rows_quarantined.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from itertools import islice
from math import ceil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from sr_ray.data.config import PreprocessConfig
from sr_ray.data.images import ImageLimits, ImageRejected, normalise_image_bytes, read_image_file, rendered_image_bytes, sha256_hex
from sr_ray.data.manifest import MANIFEST, QUARANTINE, SCHEMA_VERSION, SHARDS, summarise_shards, write_manifest
from sr_ray.data.schema import PIPELINE_ONLY_COLUMNS, PIPELINE_SCHEMA, SOURCES
from sr_ray.data.sources import READERS, SourceContext, SourceMissing
from sr_ray.data.splits import hash_split
from sr_ray.data.typography import font_names
from sr_ray.runtime import ensure_ray

log = logging.getLogger(__name__)

TEXT_ROWS_PER_BLOCK_FACTOR = 64  # text rows are cheap: 64x bigger blocks than image rows
QUARANTINE_SCAN_ROWS = 4096
QUARANTINE_COLUMNS = ["id", "item_id", "source", "variant", "quarantine_reason", "provenance", "prompt"]
# Config fields that change the output data (the rest are about how/where the run happens).
DATA_CONFIG_FIELDS = ("sources", "variants", "limit_per_source", "seed", "split_fractions",
                      "max_image_bytes", "max_pixels", "max_side")


@dataclass
class ReadResult:
    rows: list[dict]
    skipped_sources: dict[str, str] = field(default_factory=dict)
    input_checksums: dict[str, str] = field(default_factory=dict)


def read_rows(cfg: PreprocessConfig) -> ReadResult:
    """Run every requested reader, apply variant filter and per-source limit, assign splits."""
    names = cfg.sources or list(SOURCES)
    unknown = [n for n in names if n not in READERS]
    if unknown:
        raise ValueError(f"unknown sources {unknown}; known: {list(READERS)}")
    ctx = SourceContext(Path(cfg.data_dir).expanduser().resolve(), cfg.optional_dir("mmsafetybench_images"),
                        cfg.optional_dir("coco_dir"), cfg.optional_dir("jailbreakv_images"))
    if not ctx.root.is_dir():
        raise FileNotFoundError(f"data dir {ctx.root} does not exist")
    result = ReadResult(rows=[])
    for name in tqdm(names, desc="read sources", unit="source", disable=not cfg.progress):
        # Unparsed rows have no variant yet; they always pass the variant filter (nothing silently dropped).
        wanted = (r for r in READERS[name](ctx) if cfg.variants is None or r["variant"] in cfg.variants + ["unparsed"])
        try:
            result.rows += islice(wanted, cfg.limit_per_source)
        except SourceMissing as missing:
            result.skipped_sources[name] = str(missing)
            log.warning("source %s skipped: %s", name, missing)
    seen: set[str] = set()
    for row in result.rows:
        if row["split"] is None:
            row["split"] = hash_split(f"{row['source']}:{row['item_id']}", cfg.seed, cfg.split_fractions)
        if row["id"] in seen and row["quarantine_reason"] is None:
            row["quarantine_reason"] = f"duplicate id {row['id']}"
        seen.add(row["id"])
    result.input_checksums = dict(sorted(ctx.checksums.items()))
    return result


def process_row(row: dict, limits: ImageLimits) -> dict:
    """Validate one row and attach its normalised image; failures set `quarantine_reason`."""
    if row["quarantine_reason"] is not None:
        return row
    try:
        if not (row["prompt"] or "").strip():
            raise ImageRejected("empty prompt")
        if row["image_path"]:
            row["image"] = normalise_image_bytes(read_image_file(row["image_path"], limits), limits)
        elif row["render_style"]:
            row["image"] = rendered_image_bytes(row["render_style"], row["render_text"], limits)
        row["image_sha256"] = sha256_hex(row["image"]) if row["image"] is not None else None
    except ImageRejected as rejected:
        row["quarantine_reason"] = str(rejected)
    except Exception as err:  # bad input must never crash the job
        row["quarantine_reason"] = f"unexpected error: {type(err).__name__}: {err}"
    if row["quarantine_reason"] is not None:
        row["image"] = row["image_sha256"] = None
    return row


def process_batch(batch: pa.Table, limits: ImageLimits) -> pa.Table:
    rows = [process_row(row, limits) for row in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=PIPELINE_SCHEMA)


def keep_rows(batch: pa.Table, quarantined: bool) -> pa.Table:
    is_bad = pc.is_valid(batch.column("quarantine_reason"))
    return batch.filter(is_bad if quarantined else pc.invert(is_bad))


def run_with_ray(rows: list[dict], cfg: PreprocessConfig, shard_dir: Path) -> list[dict]:
    """Ray Data: decode in parallel tasks, write shards; returns the quarantined rows."""
    import ray
    from ray.data import DataContext

    from sr_ray.data.tokenize import ChatTokenize

    ensure_ray(cfg.num_cpus)
    DataContext.get_current().enable_progress_bars = cfg.progress
    # Image rows do the heavy work: small blocks spread it over all CPUs. Text rows: big blocks.
    image_rows = [r for r in rows if r["image_path"] or r["render_style"]]
    text_rows = [r for r in rows if not (r["image_path"] or r["render_style"])]
    parts = [
        ray.data.from_items(part, override_num_blocks=max(1, ceil(len(part) / per_block)))
        for part, per_block in ((image_rows, cfg.rows_per_block), (text_rows, cfg.rows_per_block * TEXT_ROWS_PER_BLOCK_FACTOR))
        if part
    ]
    if not parts:
        return []
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # Ray Data's per-operator resource reservation (on by default) held the decode stage to one task for 54% of
    # the run on a 2-CPU node (1,940 image rows: 19.6 s warm, 14.3 s without it). The decode dataset has one
    # operator, so there is nothing to reserve for; the datasets after it keep the default.
    ds.context.op_resource_reservation_enabled = False
    processed = ds.map_batches(process_batch, fn_kwargs={"limits": cfg.image_limits}, batch_format="pyarrow",
                               batch_size=None, zero_copy_batch=True, num_cpus=cfg.cpus_per_task).materialize()
    processed.context.op_resource_reservation_enabled = DataContext.get_current().op_resource_reservation_enabled
    good = processed.map_batches(keep_rows, fn_kwargs={"quarantined": False}, batch_format="pyarrow", batch_size=None)
    good = good.drop_columns(list(PIPELINE_ONLY_COLUMNS))
    if cfg.tokenizer:
        good = good.map_batches(ChatTokenize, fn_constructor_args=(cfg.tokenizer,), batch_format="pyarrow", concurrency=1)
    good.write_parquet(str(shard_dir), min_rows_per_file=1024)
    # Quarantined rows are few: one task per QUARANTINE_SCAN_ROWS rows instead of one per block.
    bad = processed.map_batches(keep_rows, fn_kwargs={"quarantined": True}, batch_format="pyarrow",
                                batch_size=QUARANTINE_SCAN_ROWS)
    return bad.select_columns(QUARANTINE_COLUMNS).take_all()


def run_in_loop(rows: list[dict], cfg: PreprocessConfig, shard_dir: Path) -> list[dict]:
    """The same work in one process (no Ray): debugging, and the baseline of `sr-ray bench data`."""
    from sr_ray.data.tokenize import ChatTokenize

    limits = cfg.image_limits
    processed = [process_row(row, limits) for row in tqdm(rows, desc="decode", unit="row", disable=not cfg.progress)]
    table = pa.Table.from_pylist(processed, schema=PIPELINE_SCHEMA)
    good = keep_rows(table, quarantined=False).drop_columns(list(PIPELINE_ONLY_COLUMNS))
    if cfg.tokenizer and good.num_rows:
        good = ChatTokenize(cfg.tokenizer)(good)
    if good.num_rows:
        shard_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(good, shard_dir / "part-00000.parquet")
    return keep_rows(table, quarantined=True).select(QUARANTINE_COLUMNS).to_pylist()


def run_preprocess(cfg: PreprocessConfig) -> dict:
    """Library entry: read every source, process, write `OUT/shards/*.parquet`, `OUT/quarantine.jsonl`,
    `OUT/manifest.json`; returns the manifest."""
    started = time.perf_counter()
    out_dir = Path(cfg.out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    shard_dir = out_dir / SHARDS
    shutil.rmtree(shard_dir, ignore_errors=True)  # a rerun replaces the previous output, never mixes with it
    for name in (MANIFEST, QUARANTINE):
        (out_dir / name).unlink(missing_ok=True)

    read = read_rows(cfg)
    runner = run_with_ray if cfg.executor == "ray" else run_in_loop
    quarantined = sorted(runner(read.rows, cfg, shard_dir), key=lambda q: (q["id"], q["provenance"] or ""))
    with open(out_dir / QUARANTINE, "w") as f:
        for q in quarantined:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")

    summary = summarise_shards(out_dir)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "rows_read": len(read.rows),
        "rows_written": summary.pop("rows_written"),
        "rows_quarantined": len(quarantined),
        **summary,
        "quarantine": [{"id": q["id"], "reason": q["quarantine_reason"], "provenance": q["provenance"]} for q in quarantined],
        "skipped_sources": read.skipped_sources,
        "input_checksums": read.input_checksums,
        "config": {k: v for k, v in cfg.to_dict().items() if k in DATA_CONFIG_FIELDS},
        "fonts": font_names(),
        "tokenized": bool(cfg.tokenizer),
        "run": {
            "executor": cfg.executor,
            "seconds": round(time.perf_counter() - started, 3),
            "data_dir": str(Path(cfg.data_dir).expanduser().resolve()),
            "out_dir": str(out_dir),
            "tokenizer": cfg.tokenizer,
            "shards": sorted(p.name for p in shard_dir.glob("*.parquet")),
        },
    }
    write_manifest(out_dir, manifest)
    if manifest["rows_read"] != manifest["rows_written"] + manifest["rows_quarantined"]:
        raise RuntimeError(
            f"row accounting broken: read {manifest['rows_read']} != written {manifest['rows_written']}"
            f" + quarantined {manifest['rows_quarantined']} (see {out_dir / MANIFEST})"
        )
    return manifest
