"""`sr-ray preprocess`, `sr-ray data stats DIR`, `sr-ray bench data`."""

from __future__ import annotations

import argparse
import json

from sr_ray.config_types import build
from sr_ray.data.config import PreprocessConfig


OVERRIDABLE = ("data_dir", "out_dir", "sources", "variants", "limit_per_source", "seed", "max_side", "num_cpus",
               "executor", "mmsafetybench_images", "coco_dir", "jailbreakv_images", "tokenizer", "progress")


def _csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI overrides of `PreprocessConfig` (shared with pipelines/preprocess.py). None = keep config/default."""
    parser.add_argument("--data-dir", help="data directory laid out like shared/data (default: sr_ray.data.default_data_dir())")
    parser.add_argument("--out", dest="out_dir", help="output directory (default: runs/data)")
    parser.add_argument("--sources", type=_csv_list, help="comma-separated source names (default: all found)")
    parser.add_argument("--variants", type=_csv_list, help="comma-separated variant names (default: all)")
    parser.add_argument("--limit-per-source", type=int, help="first N rows per source")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-side", type=int)
    parser.add_argument("--num-cpus", type=int, help="CPUs for ray.init when no Ray session is running")
    parser.add_argument("--executor", choices=["ray", "loop"])
    parser.add_argument("--mmsafetybench-images", help="folder <scenario>/{SD_TYPO,SD}/<id>.jpg (upstream imgs/)")
    parser.add_argument("--coco-dir", help="COCO train2017 images for VLSafe image rows")
    parser.add_argument("--jailbreakv-images", help="JailBreakV-28K folder that its image_path column is relative to")
    parser.add_argument("--tokenizer", help="local tokenizer/processor dir: add chat_prompt + input_ids columns")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    """YAML (`--config`, if any), then CLI flags that were given; data_dir/out_dir defaults last."""
    from sr_ray.data import default_data_dir

    values = PreprocessConfig.yaml_values(args.config) if getattr(args, "config", None) else {}
    values.update({k: v for k, v in vars(args).items() if k in OVERRIDABLE and v is not None})
    values.setdefault("data_dir", str(default_data_dir()))
    values.setdefault("out_dir", "runs/data")
    return build(PreprocessConfig, values)  # every value checked against its field's type


def cmd_preprocess(args: argparse.Namespace) -> int:
    from sr_ray.data.manifest import format_stats
    from sr_ray.data.pipeline import run_preprocess

    cfg = config_from_args(args)
    manifest = run_preprocess(cfg)
    print(format_stats(manifest))
    print(f"\nwrote {cfg.out_dir}/shards/*.parquet, manifest.json, quarantine.jsonl")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from sr_ray.data.manifest import format_stats, manifest_checksum, read_manifest

    print(format_stats(read_manifest(args.dir)))
    print(f"\nmanifest_checksum {manifest_checksum(args.dir)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from sr_ray.data.bench import run_data_benchmark, write_benchmark

    result = run_data_benchmark(args.data_dir, num_cpus=args.num_cpus, limit_per_source=args.limit_per_source,
                                repeat=args.repeat, trials=args.trials)
    write_benchmark(result, args.out)
    print(json.dumps(result, indent=2))
    return 0


def add_commands(sub, bench) -> None:
    pre = sub.add_parser("preprocess", help="benchmarks -> validated Parquet shards + manifest (Ray Data)")
    pre.add_argument("--config", help="YAML with PreprocessConfig fields (e.g. configs/preprocess.yaml)")
    add_preprocess_arguments(pre)
    pre.set_defaults(func=cmd_preprocess)

    data = sub.add_parser("data", help="inspect preprocessed data").add_subparsers(dest="data_command", required=True)
    stats = data.add_parser("stats", help="print a preprocess output's manifest as tables")
    stats.add_argument("dir", help="output directory of `sr-ray preprocess`")
    stats.set_defaults(func=cmd_stats)

    b = bench.add_parser("data", help="Ray Data pipeline vs one-process loop on the image-heavy sources")
    b.add_argument("--data-dir", required=True)
    b.add_argument("--out", required=True, help="JSON file for the result")
    b.add_argument("--num-cpus", type=int, help="CPUs for ray.init (default: all cores)")
    b.add_argument("--limit-per-source", type=int, help="fewer rows (to find where Ray pays off)")
    b.add_argument("--repeat", type=int, default=1, help="replicate the rows N times (to find where Ray pays off)")
    b.add_argument("--trials", type=int, default=1, help="alternate ray/loop N times, report medians")
    b.set_defaults(func=cmd_bench)
