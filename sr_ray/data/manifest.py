"""`manifest.json`: what a preprocessing run read, wrote and quarantined, and a checksum of it.

Everything outside the manifest's `run` section depends only on the inputs and the data-affecting
config, so two runs over the same data on any machine (with the same fonts) give the same
`manifest_checksum`; `run` holds timings, paths and shard file names.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads

MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
SHARDS = "shards"
SCHEMA_VERSION = 1
COUNT_COLUMNS = ("source", "variant", "category", "label", "split")
DIGEST_COLUMNS = ("id", "variant", "category", "label", "split", "prompt", "image_sha256", "reference")


def _count(values) -> dict[str, int]:
    return dict(sorted(Counter("(none)" if v is None else str(v) for v in values).items()))


def summarise_shards(out_dir: Path) -> dict:
    """Counts and a content digest, read back from the written shards (not from what we meant to write)."""
    shard_dir = out_dir / SHARDS
    files = sorted(shard_dir.glob("*.parquet"))
    if not files:
        return {"rows_written": 0, "content_sha256": hashlib.sha256(b"").hexdigest(),
                **{f"by_{c}": {} for c in COUNT_COLUMNS}, "by_source_variant": {}, "paper_subset_rows": 0}
    table = pads.dataset([str(f) for f in files], format="parquet").to_table(
        columns=sorted(set(COUNT_COLUMNS + DIGEST_COLUMNS + ("paper_subset",)))
    )
    cols = table.to_pydict()
    digest = hashlib.sha256()
    for row in sorted(zip(*(cols[c] for c in DIGEST_COLUMNS))):
        digest.update(json.dumps(row, ensure_ascii=False).encode() + b"\n")
    summary = {"rows_written": table.num_rows, "content_sha256": digest.hexdigest()}
    summary.update({f"by_{c}": _count(cols[c]) for c in COUNT_COLUMNS})
    summary["by_source_variant"] = _count(f"{s}/{v}" for s, v in zip(cols["source"], cols["variant"]))
    summary["paper_subset_rows"] = sum(bool(x) for x in cols["paper_subset"])
    return summary


def write_manifest(out_dir: Path, manifest: dict) -> None:
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def read_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {out_dir} the output of `sr-ray preprocess`?")
    return json.loads(path.read_text())


def manifest_checksum(out_dir: str | Path) -> str:
    """sha256 of the manifest without its `run` section (canonical JSON): binds a trained bundle to data."""
    manifest = {k: v for k, v in read_manifest(out_dir).items() if k != "run"}
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def log_manifest_input(tracking_uri: str, run_id: str, data_dir: str | Path, context: str) -> bool:
    """Log the preprocessed data's manifest as the run's dataset input (`mlflow.log_input`); False when
    `data_dir` has no manifest (official-format files only)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from sr_ray.tracking import mlflow_client

    data_dir = Path(data_dir)
    if not (data_dir / MANIFEST).exists():
        return False
    manifest = read_manifest(data_dir)
    profile = {k: manifest.get(k) for k in ("rows_written", "rows_quarantined", "by_source", "by_split")}
    dataset = Dataset(name=f"sr_ray-preprocessed:{data_dir.name}", digest=manifest_checksum(data_dir)[:32],
                      source_type="local", source=json.dumps({"uri": data_dir.resolve().as_uri()}),
                      profile=json.dumps(profile))
    mlflow_client(tracking_uri).log_inputs(run_id, datasets=[
        DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])
    return True


def format_stats(manifest: dict) -> str:
    """The manifest as plain-text tables (for `sr-ray data stats`)."""
    lines = [
        f"rows_read        {manifest['rows_read']:>8}",
        f"rows_written     {manifest['rows_written']:>8}",
        f"rows_quarantined {manifest['rows_quarantined']:>8}",
        f"paper_subset     {manifest['paper_subset_rows']:>8}",
        f"content_sha256   {manifest['content_sha256']}",
    ]
    for key in ("by_source", "by_source_variant", "by_label", "by_split", "by_category"):
        table = manifest.get(key, {})
        width = max([len(k) for k in table] + [len(key)])
        lines += ["", f"{key:<{width}}  {'rows':>7}", f"{'-' * width}  {'-' * 7}"]
        lines += [f"{k:<{width}}  {v:>7}" for k, v in table.items()]
    if manifest.get("skipped_sources"):
        lines += ["", "skipped sources:"] + [f"  {k}: {v}" for k, v in manifest["skipped_sources"].items()]
    reasons = Counter(q["reason"].split(":")[0] for q in manifest.get("quarantine", []))
    if reasons:
        lines += ["", "quarantine reasons:"] + [f"  {n:>6}  {r}" for r, n in reasons.most_common()]
    return "\n".join(lines)
